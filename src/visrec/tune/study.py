"""The study: its spec, Optuna storage (SQLite or any SQLAlchemy URL, one engine per process), samplers,
pruners, stages, and queued trials."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, TaskConfig, resolve_config
from ..errors import VisrecError, unknown_name
from ..io import write_json
from ..runs import run_label
from .space import (
    PRUNERS,
    STRATEGIES,
    Param,
    _hashable,
    _unhashable,
    grid_params,
    narrow,
    parse_space,
    random_params,
    task_class,
)


@dataclass
class StudySpec:
    """Everything a worker needs, stored as the Optuna study's user attribute `visrec` (and study.json)."""

    name: str
    storage: str
    folder: str
    data: str
    base: dict[str, Any]  # the resolved config every trial starts from
    space: dict[str, Any]
    strategy: str
    trials: int
    epochs: int
    pruner: str
    seed: int
    heartbeat: int
    stages: list[str]  # Optuna study names, in order (coarse-to-fine has two)
    previous_trials: int = 0  # trials the study already held when this search added its own

    def params(self) -> list[Param]:
        return parse_space(self.space)

    def objective(self) -> tuple[str, bool]:
        """(the task's primary validation metric the trials are judged by, whether higher is better)."""
        task = task_class((self.base.get("task") or {}).get("name") or TaskConfig().name)
        return task.primary, task.maximize

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _quiet_optuna():
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


_STORAGES: dict[tuple[str, int], object] = {}  # one engine per URL in a process, not one per look at the study


def _storage(url: str, heartbeat: int):
    if (url, heartbeat) not in _STORAGES:
        _STORAGES[url, heartbeat] = _open_storage(url, heartbeat)
    return _STORAGES[url, heartbeat]


def _open_storage(url: str, heartbeat: int):
    import optuna
    from optuna.storages import RDBStorage

    _quiet_optuna()
    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat, "grace_period": 2 * heartbeat + 1}
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    else:  # Optuna < 5
        kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=3)
    sqlite = url.startswith("sqlite")
    # SQLite: no implicit transactions from the driver (isolation_level=None); every transaction is opened below
    # with BEGIN IMMEDIATE instead.
    engine = {"connect_args": {"timeout": 60, "isolation_level": None}} if sqlite else {"pool_pre_ping": True}
    try:
        storage = RDBStorage(url, engine_kwargs=engine, **kwargs)
    except Exception as e:  # noqa: BLE001 - any driver or connection error: report the URL and the fix
        raise VisrecError(f"cannot open the study storage {url}: {type(e).__name__}: {str(e).splitlines()[0]}",
                          "check the URL (sqlite:///PATH or postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB), that "
                          "the server is up and reachable, and that its driver is installed (pip install "
                          "psycopg2-binary for PostgreSQL)") from None
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine) -> None:
    """Make each SQLite transaction take the write lock when it begins.

    Optuna claims a queued trial by reading that it is WAITING and then writing RUNNING, inside one transaction
    that asks for a row lock (SELECT ... FOR UPDATE). SQLite has no row locks, and Python's sqlite3 starts a
    transaction only at the first write, so two workers could both read WAITING and both claim the same trial:
    one then failed on the other's run folder and the other's finished result was refused. With BEGIN
    IMMEDIATE the second claim waits for the first to commit, then reads RUNNING and takes the next trial.
    (PostgreSQL honours FOR UPDATE and needs nothing.)"""
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sampler(spec: StudySpec, worker: int):
    import optuna

    if spec.strategy == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed * 1000 + worker, n_startup_trials=max(3, spec.trials // 5),
                                          constant_liar=True)
    return optuna.samplers.RandomSampler(seed=spec.seed * 1000 + worker)  # only for parameters not queued


def _pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_stage(spec: StudySpec, stage: str, worker: int = 0):
    import optuna

    return optuna.create_study(storage=_storage(spec.storage, spec.heartbeat), study_name=stage,
                               sampler=_sampler(spec, worker), pruner=_pruner(spec.pruner),
                               direction="maximize" if spec.objective()[1] else "minimize",
                               load_if_exists=True)


def load_spec(storage: str, name: str) -> StudySpec:
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=_storage(storage, 60))
    except KeyError:
        raise VisrecError(f"there is no study {name!r} in {storage}", "start it with visrec tune first") from None
    doc = study.user_attrs.get("visrec")
    if not doc:
        raise VisrecError(f"study {name!r} in {storage} was not created by visrec tune")
    return StudySpec(**{**doc, "base": Config.from_dict(copy.deepcopy(doc["base"]), "study config").to_dict()})


def _state_counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def create_study(data: str, *, space: dict[str, Any] | str | Path | None = None, trials: int = 20,
                 strategy: str = "random", epochs: int | None = None, model: str | None = None,
                 preset: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
                 storage: str | None = None, study: str | None = None, out: str | Path | None = None,
                 pruner: str = "median", seed: int = 0, heartbeat: int = 10) -> StudySpec:
    """Create (or extend) a study and queue its trials; returns the spec that workers run."""
    if strategy not in STRATEGIES:
        raise unknown_name("search strategy", strategy, STRATEGIES, "--strategy")
    if pruner not in PRUNERS:
        raise unknown_name("pruner", pruner, PRUNERS, "--pruner")
    if trials < 1:
        raise VisrecError(f"--trials {trials} must be at least 1")
    if heartbeat < 1:
        raise VisrecError(f"--heartbeat {heartbeat} must be at least 1 second")
    cfg = resolve_config(preset, overrides)
    params = parse_space(space if space is not None else task_class(cfg.task.name).search_space)
    cfg.data.name = data
    if model:
        cfg.model.name = model
    if epochs is not None:
        cfg.train.epochs = epochs
    if cfg.data.val_fraction == 0:
        raise VisrecError("hyperparameter search judges trials on the validation split, but data.val_fraction=0",
                          "set data.val_fraction > 0 (the test split is never used during the search)")
    name = study or run_label(data, cfg.model.name)
    folder = Path(out) if out else Path("runs") / f"tune-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    stages = [f"{name}.coarse", name] if strategy == "coarse-to-fine" else [name]
    spec = StudySpec(name, url, str(folder.resolve()), data, cfg.anchored().to_dict(),
                     {p.key: p.to_spec() for p in params}, strategy, trials, cfg.train.epochs, pruner, seed,
                     heartbeat, stages)
    main = open_stage(spec, name)
    spec.previous_trials = sum(len(open_stage(spec, s).trials) for s in stages)
    old = main.user_attrs.get("visrec")
    if old:  # a study stored before keys moved between sections compares by its current layout
        old = {**old, "base": Config.from_dict(copy.deepcopy(old["base"]), "study config").to_dict()}
    if old and (old["space"] != spec.space or old["strategy"] != strategy or old["base"] != spec.base):
        raise VisrecError(f"study {name!r} already exists in {url} with another space, strategy or config",
                          "choose another --study name (or --out folder) for a new search")
    main.set_user_attr("visrec", spec.to_json())
    write_json(folder / "study.json", spec.to_json())
    # A study searched again gets new points, not the first search's draws once more.
    draw_seed = seed + 7919 * spec.previous_trials
    if strategy == "coarse-to-fine":
        n1 = max(1, math.ceil(trials / 2))
        _enqueue(open_stage(spec, stages[0]), random_params(params, n1, draw_seed), "coarse",
                 max(1, spec.epochs // 3))
    elif strategy == "tpe":
        _enqueue(main, [{} for _ in range(trials)], "tpe", spec.epochs)
    else:
        draw = random_params if strategy == "random" else grid_params
        _enqueue(main, draw(params, trials, draw_seed), strategy, spec.epochs)
    return spec


def _enqueue(study, points: list[dict[str, Any]], stage: str, epochs: int) -> None:
    for p in points:
        study.enqueue_trial({k: _hashable(v) for k, v in p.items()}, user_attrs={"stage": stage, "epochs": epochs})


def _advance(spec: StudySpec) -> bool:
    """Coarse-to-fine: once the coarse stage is finished, queue the fine stage around its best region (once).
    Returns True when every stage has its trials queued."""
    if spec.strategy != "coarse-to-fine":
        return True
    fine = open_stage(spec, spec.stages[1])
    if fine.user_attrs.get("space"):
        return True
    coarse = open_stage(spec, spec.stages[0])
    c = _state_counts(coarse)
    if c.get("WAITING", 0) or c.get("RUNNING", 0):
        return False
    done = [(t.params, t.value) for t in coarse.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    results = [({k: _unhashable(v) for k, v in p.items()}, v) for p, v in done]
    narrowed = narrow(spec.params(), results)
    fine.set_user_attr("space", {p.key: p.to_spec() for p in narrowed})
    n2 = spec.trials - max(1, math.ceil(spec.trials / 2))
    _enqueue(fine, random_params(narrowed, n2, spec.seed + 1), "fine", spec.epochs)
    return True
