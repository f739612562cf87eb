"""Hyperparameter search on Optuna: random in log space, grid, TPE, and coarse-to-fine; parallel workers.

The course's recipe: random search beats grid search; sample learning rate and regularization in log space;
start coarse with few epochs, then refine; stop trials that blow up; look at the results.

    visrec tune fashion-mnist --space space.yaml --trials 20 --workers 2 --epochs 3

A search space is YAML, one line per config key:

    optim.lr: {loguniform: [1.0e-4, 1.0]}
    optim.weight_decay: {loguniform: [1.0e-6, 1.0e-2]}
    loss.label_smoothing: {uniform: [0.0, 0.2]}
    train.batch_size: {categorical: [64, 128, 256]}
    model.kwargs.widths: {categorical: [[16, 32, 64], [32, 64, 128]]}
    train.epochs: {int: [2, 6]}

Every trial is a visrec run folder inside the study folder, judged by its final validation accuracy; the test
split is never touched during the search (`--final` retrains the best config and evaluates on test once).

Trials live in Optuna RDB storage: a SQLite file in the study folder by default, or any SQLAlchemy URL (e.g.
PostgreSQL) that workers on several machines share. The parameters of random, grid and coarse-to-fine trials are
drawn up front from the seed and queued; TPE trials are queued as tickets its sampler fills in. Workers take
queued trials until none is left, so N trials run exactly once each. A worker sends a heartbeat while it trains;
when one dies (even by SIGKILL) its trial is marked failed after the grace period and queued again with the same
parameters, and the other workers carry on.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .config import Config, TaskConfig, bounds, resolve_config
from .errors import VisrecError, unknown_name
from .io import write_bytes, write_json, write_text, write_yaml
from .runs import Run, run_label

STRATEGIES = ("random", "grid", "tpe", "coarse-to-fine")
PRUNERS = ("median", "asha", "none")
KINDS = ("loguniform", "uniform", "int", "categorical")

DEFAULT_SPACE = {
    "optim.lr": {"loguniform": [0.01, 1.0]},
    "optim.weight_decay": {"loguniform": [1.0e-5, 1.0e-2]},
    "loss.label_smoothing": {"uniform": [0.0, 0.2]},
    "train.batch_size": {"categorical": [64, 128, 256]},
}
# A task whose recipe lives elsewhere declares its own space (Task.search_space: a detector's).



def task_class(name: str):
    """The task's class (its primary metric, direction and declared capabilities), registered or from a file."""
    from .tasks import task_class as of

    return of(name)

# ---------------------------------------------------------------- search spaces

@dataclass
class Param:
    key: str
    kind: str  # loguniform | uniform | int | categorical
    low: float = 0.0
    high: float = 0.0
    choices: list[Any] = field(default_factory=list)

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def to_spec(self) -> dict[str, Any]:
        return {self.kind: self.choices if self.kind == "categorical" else [self.low, self.high]}

    def distribution(self):
        import optuna

        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution([_hashable(c) for c in self.choices])
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return _unhashable(trial.suggest_categorical(self.key, [_hashable(c) for c in self.choices]))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "categorical":
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.kind == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def grid(self, k: int) -> list[Any]:
        """k points spread over the range (geometrically for log ranges); every choice of a categorical."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return sorted({int(round(v)) for v in np.linspace(self.low, self.high, k)})
        if k == 1:
            return [float(math.sqrt(self.low * self.high)) if self.log else (self.low + self.high) / 2]
        if self.log:
            return [float(v) for v in np.geomspace(self.low, self.high, k)]
        return [float(v) for v in np.linspace(self.low, self.high, k)]

    def position(self, value: Any) -> float | None:
        """Where `value` sits in the range, 0..1 (in log space for log ranges); None for categoricals."""
        if self.kind == "categorical" or self.high == self.low:
            return None
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (float(value) - self.low) / (self.high - self.low)


def _hashable(value: Any) -> Any:
    """Optuna's categorical choices must be None, bool, int, float or str: lists travel as JSON text."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def _unhashable(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_space(doc: dict[str, Any] | str | Path | None, source: str = "search space") -> list[Param]:
    """A search space from a mapping or a YAML file; every mistake names the key and the fix."""
    if doc is None:
        doc = DEFAULT_SPACE
    elif isinstance(doc, str | Path):
        path = Path(doc)
        if not path.is_file():
            raise VisrecError(f"search space file {path} does not exist", "give a YAML file: optim.lr: {loguniform: "
                              "[1.0e-4, 1.0]}, one line per config key")
        source = str(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise VisrecError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise VisrecError(f"{source}: a search space is a mapping of config keys to ranges",
                          "for example: optim.lr: {loguniform: [1.0e-4, 1.0]}")
    cfg = Config()
    params = []
    for key, spec in doc.items():
        params.append(_parse_param(str(key), spec, source))
        p = params[-1]
        probe = p.choices[0] if p.kind == "categorical" else (int(p.low) if p.kind == "int" else p.low)
        try:
            Config.from_dict(cfg.to_dict()).set(p.key, probe, source=source)
        except VisrecError as e:
            raise VisrecError(f"{source}: {e.message}", e.hint or "see visrec config --keys") from None
    return params


def _parse_param(key: str, spec: Any, source: str) -> Param:
    example = "for example: optim.lr: {loguniform: [1.0e-4, 1.0]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise VisrecError(f"{source}: {key} must map to one distribution, got {spec!r}", example)
    kind, arg = next(iter(spec.items()))
    if kind not in KINDS:
        raise unknown_name(f"distribution of {key}", kind, KINDS, source)
    if kind == "categorical":
        if not isinstance(arg, list) or not arg:
            raise VisrecError(f"{source}: {key}: categorical needs a non-empty list of values", f"{key}: {{categorical:"
                              " [64, 128, 256]}")
        return Param(key, kind, choices=list(arg))
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                            for v in arg)):
        raise VisrecError(f"{source}: {key}: {kind} needs [low, high] numbers, got {arg!r}", example)
    low, high = float(arg[0]), float(arg[1])
    if low > high:
        raise VisrecError(f"{source}: {key}: the low bound {arg[0]} is above the high bound {arg[1]}",
                          f"swap them: {{{kind}: [{arg[1]}, {arg[0]}]}}")
    if low == high:
        raise VisrecError(f"{source}: {key}: the range [{arg[0]}, {arg[1]}] is empty",
                          f"widen it, or fix the value with --set {key}={arg[0]} and leave it out of the space")
    if kind == "loguniform" and low <= 0:
        raise VisrecError(f"{source}: {key}: a loguniform range needs positive bounds, got [{arg[0]}, {arg[1]}]",
                          f"use uniform for ranges that include 0, or start at a small positive value (e.g. "
                          f"{high / 1000:g})")
    if kind == "int" and not (float(arg[0]).is_integer() and float(arg[1]).is_integer()):
        raise VisrecError(f"{source}: {key}: int needs integer bounds, got {arg!r}")
    return Param(key, kind, low, high)


def random_params(params: list[Param], n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{p.key: p.sample(rng) for p in params} for _ in range(n)]


def grid_params(params: list[Param], n: int, seed: int) -> list[dict[str, Any]]:
    """n points of the coarsest full grid with at least n points (k per numeric axis), in a seeded order."""
    cats = math.prod(len(p.choices) for p in params if p.kind == "categorical")
    numeric = [p for p in params if p.kind != "categorical"]
    k = 1
    while numeric and cats * math.prod(len(p.grid(k)) for p in numeric) < n and k < 1000:
        k += 1
    axes = [p.grid(k) for p in params]
    points = [dict(zip([p.key for p in params], combo, strict=True)) for combo in _product(axes)]
    order = np.random.default_rng(seed).permutation(len(points))
    return [points[i] for i in order[:n]]


def _product(axes: list[list[Any]]) -> list[tuple]:
    out: list[tuple] = [()]
    for axis in axes:
        out = [t + (v,) for t in out for v in axis]
    return out


def narrow(params: list[Param], results: list[tuple[dict[str, Any], float]], top: float = 0.25,
           min_top: int = 3) -> list[Param]:
    """The coarse-to-fine step: each range shrunk to the span of the best trials' values (the top `top` fraction,
    at least `min_top`), widened by a quarter of that span on each side (in log space for log ranges) and kept inside
    the original range; categoricals keep the values the best trials used."""
    ranked = sorted((r for r in results if r[1] is not None and math.isfinite(r[1])), key=lambda r: -r[1])
    best = ranked[: max(min_top, math.ceil(top * len(ranked)))]
    if not best:
        return params
    out = []
    for p in params:
        values = [b[0][p.key] for b in best if p.key in b[0]]
        if not values:
            out.append(p)
            continue
        if p.kind == "categorical":
            keep = [c for c in p.choices if any(_same(c, v) for v in values)]
            out.append(Param(p.key, p.kind, choices=keep or p.choices))
            continue
        f = math.log if p.log else float
        inv = math.exp if p.log else float
        lo, hi = min(f(v) for v in values), max(f(v) for v in values)
        pad = max((hi - lo) / 4, (f(p.high) - f(p.low)) * 0.05)
        low, high = max(inv(lo - pad), p.low), min(inv(hi + pad), p.high)
        if p.kind == "int":
            low, high = math.floor(low), math.ceil(high)
            if low == high:
                low, high = max(p.low, low - 1), min(p.high, high + 1)
        out.append(Param(p.key, p.kind, float(low), float(high)))
    return out


def _same(a: Any, b: Any) -> bool:
    return _hashable(a) == _hashable(b)


def edge_warnings(params: list[Param], best: dict[str, Any], margin: float = 0.1) -> list[str]:
    """The course's warning: a best value near the edge of its range means the optimum may lie outside."""
    out = []
    for p in params:
        if p.key not in best:
            continue
        pos = p.position(best[p.key])
        if pos is None:
            continue
        if pos <= margin or pos >= 1 - margin:
            side = "bottom" if pos <= margin else "top"
            try:
                lo, hi = bounds(p.key)
            except (KeyError, ValueError, AttributeError):
                lo = hi = None
            if (side == "bottom" and lo is not None and p.low <= lo) or (side == "top" and hi is not None
                                                                        and p.high >= hi):
                continue  # the range already reaches the key's natural limit (smoothing cannot go below 0)
            out.append(f"{p.key} = {best[p.key]:.4g} is at the {side} of its range [{p.low:g}, {p.high:g}]: the best "
                       f"value may lie beyond it; widen the range {'down' if side == 'bottom' else 'up'} and search "
                       "again")
    return out


def noise_warning(best: dict[str, Any], runner_up: dict[str, Any] | None, n_val: int) -> str | None:
    """Whether the best trial's lead over the runner-up is within the sampling noise of `n_val` validation images
    (two standard errors of the difference of two accuracies measured on them); the warning says what to do."""
    if runner_up is None or n_val <= 0:
        return None
    a, b = best["value"], runner_up["value"]
    p = (a + b) / 2
    noise = 2 * math.sqrt(max(2 * p * (1 - p), 1e-12) / n_val)
    if a - b >= noise:
        return None
    return (f"the best trial (#{best['number']}, {a:.2%}) leads the runner-up (#{runner_up['number']}, {b:.2%}) by "
            f"{a - b:.2%}, within the noise of {n_val} validation images (a lead under {noise:.1%} can be chance): "
            "retrain the two (or the top few) with other seeds, or give more validation images "
            "(data.val_fraction), before trusting the choice")


# ---------------------------------------------------------------- the study

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


# ---------------------------------------------------------------- workers

class _Unqueued(Exception):
    """A trial Optuna created because another worker took the last queued one: dropped, not run."""


class TrialWatch:
    """Observer of one trial's training: reports the task's primary validation metric per epoch for pruning, and
    stops a trial whose loss blows up (the course's rule: more than 3x the initial loss, or not finite)."""

    def __init__(self, trial, initial_loss: float | None):
        self.trial, self.initial_loss = trial, initial_loss  # None: the first logged window's loss (a task whose
        self.reason: str | None = None  # chance loss is not known, e.g. a detector's sum of terms)

    def on_train_start(self, state) -> None: ...

    def on_window(self, state, record) -> None:
        loss = record["loss"]
        if self.initial_loss is None and math.isfinite(loss):
            self.initial_loss = loss
            return
        if not math.isfinite(loss) or loss > 3 * self.initial_loss:
            self.reason = (f"loss {loss:.4g} at step {record['step']} exceeds 3x the initial loss "
                           f"({self.initial_loss:.3g}): the learning rate is too high")
            state.request_stop(self.reason)

    def on_epoch_end(self, state, records) -> None:
        val = [r for r in records if r["split"] == "val"]
        if not val:
            return
        value = val[-1].get(state.primary)
        if value is None:  # not measured this epoch (eval.fid_every): nothing to judge
            return
        self.trial.report(value, state.epoch)
        if state.epoch < state.epochs and self.trial.should_prune():  # a finished trial is judged, not pruned
            self.reason = f"pruned after epoch {state.epoch} (val {state.primary} {value:.4f})"
            state.request_stop(self.reason)

    def on_train_end(self, state, summary) -> None: ...


def trial_config(spec: StudySpec, values: dict[str, Any], epochs: int) -> Config:
    cfg = Config.from_dict(copy.deepcopy(spec.base), "study config")
    cfg.train.epochs = epochs
    cfg.log.every = min(cfg.log.every, 10)  # the blow-up rule looks at every window
    for key, value in values.items():
        cfg.set(key, value, source="trial")
    return cfg


class Worker:
    """Takes queued trials of a study until none is left, training each as a run folder."""

    def __init__(self, spec: StudySpec, index: int = 0, out: str | Path | None = None,
                 objective: Callable[[Any, dict[str, Any], int], float] | None = None, announce: bool = False):
        self.spec, self.index = spec, index
        self.announce = announce
        self.folder = Path(out or spec.folder)
        self.objective = objective or self._train
        self._datasets: dict[str, Any] = {}

    def _train(self, trial, values: dict[str, Any], epochs: int) -> float:
        import optuna

        from .fit import Trainer
        from .runs import dataset_from_config
        from .training import NonFiniteLoss

        cfg = trial_config(self.spec, values, epochs)
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
        if key not in self._datasets:
            self._datasets[key] = dataset_from_config(cfg)
        ds = self._datasets[key]
        if not task_class(cfg.task.name).class_scores:  # the loss at chance is known for class scores
            initial = None
        elif cfg.loss.name == "cross_entropy":
            initial = math.log(ds.num_classes)
        else:
            initial = (ds.num_classes - 1) * cfg.loss.margin
        watch = TrialWatch(trial, initial)
        stage = trial.user_attrs.get("stage", "trial")
        out = self.folder / f"{stage}-{trial.number:04d}"
        trial.set_user_attr("run", str(out))
        trainer = Trainer(cfg, out=out, dataset=ds, callbacks=[watch], quiet=True)
        try:
            run = trainer.fit(test=False)
        except NonFiniteLoss as e:
            trial.set_user_attr("stopped", f"loss became non-finite: {e.message.split(';')[0]}")
            raise optuna.TrialPruned("non-finite loss") from None
        if watch.reason:
            trial.set_user_attr("stopped", watch.reason)
            raise optuna.TrialPruned(watch.reason)
        trial.set_user_attr("train_seconds", run.summary["train_seconds"])
        return float(run.summary[f"val_{run.summary['primary_metric']}"])

    def _announce(self, study, trial) -> None:
        """One line per finished trial, as it finishes (stderr)."""
        if trial.user_attrs.get("unqueued"):
            return
        how = trial.user_attrs.get("stopped") or (f"val {trial.value:.4g}" if trial.value is not None else "")
        secs = trial.user_attrs.get("train_seconds")
        params = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                           for k, v in trial.params.items())
        print(f"trial {trial.number} ({trial.user_attrs.get('stage', '-')}) {trial.state.name.lower()}: {how}"
              + (f" in {secs:.0f} s" if secs else "") + f"  {params}", file=sys.stderr, flush=True)

    def _run_one(self, trial) -> float:
        if "stage" not in trial.user_attrs:  # not from the queue: it emptied between our look and Optuna's ask
            trial.set_user_attr("unqueued", True)
            raise _Unqueued
        params = parse_space(trial.study.user_attrs.get("space") or self.spec.space)
        values = {p.key: p.suggest(trial) for p in params}
        return self.objective(trial, values, int(trial.user_attrs.get("epochs", self.spec.epochs)))

    def run(self, poll: float = 1.0, coordinate: bool = False) -> int:
        """Run queued trials until every stage is done; returns how many this worker ran. With `coordinate`,
        this worker also queues the next coarse-to-fine stage."""
        import optuna

        _quiet_optuna()
        studies = [open_stage(self.spec, s, self.index) for s in self.spec.stages]
        ran = 0
        while True:
            if coordinate:
                _advance(self.spec)
            ran_one, running = False, False
            for study in studies:
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial goes back into the queue
                c = _state_counts(study)
                if c.get("WAITING", 0):
                    study.optimize(self._run_one, n_trials=1, catch=(VisrecError, _Unqueued),
                                   callbacks=[self._announce] if self.announce else None)
                    ran, ran_one = ran + 1, True
                    break
                running = running or bool(c.get("RUNNING", 0))
            if ran_one:
                continue
            fine_ready = self.spec.strategy != "coarse-to-fine" or bool(studies[-1].user_attrs.get("space"))
            if fine_ready and not running:
                return ran
            time.sleep(poll)  # others' trials still run: one may die and come back into the queue


def worker_main(argv: list[str] | None = None) -> None:
    """`python -m visrec.tune --storage URL --study NAME [--index I] [--out DIR]`: one worker process."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m visrec.tune", description="A visrec tune worker.")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--study", required=True)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--announce", action="store_true", help="print a line per finished trial")
    a = ap.parse_args(argv)
    spec = load_spec(a.storage, a.study)
    Worker(spec, a.index, a.out, announce=a.announce).run()


def run_workers(spec: StudySpec, workers: int, poll: float = 1.0, announce: bool = False) -> None:
    """W worker processes on this machine; this process coordinates the stages and waits for them."""
    if workers < 1:
        raise VisrecError(f"--workers {workers} must be at least 1")
    if workers == 1:
        Worker(spec, announce=announce).run(poll, coordinate=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                                                      // workers)))}
    procs = [subprocess.Popen([sys.executable, "-m", "visrec.tune", "--storage", spec.storage, "--study", spec.name,
                               "--index", str(i), *(["--announce"] if announce else [])], env=env)
             for i in range(workers)]
    try:
        while any(p.poll() is None for p in procs):
            _advance(spec)
            time.sleep(poll)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    bad = [p.returncode for p in procs if p.returncode]
    if bad and not _all_done(spec):
        raise VisrecError(f"{len(bad)} worker(s) failed (exit codes {bad}) and the study is incomplete",
                          f"continue it with: visrec tune --storage {spec.storage} --study {spec.name} --join")


def _all_done(spec: StudySpec) -> bool:
    for stage in spec.stages:
        c = _state_counts(open_stage(spec, stage))
        if c.get("WAITING", 0) or c.get("RUNNING", 0):
            return False
    return spec.strategy != "coarse-to-fine" or bool(open_stage(spec, spec.stages[-1]).user_attrs.get("space"))


# ---------------------------------------------------------------- results

def trial_rows(spec: StudySpec) -> list[dict[str, Any]]:
    rows = []
    for stage in spec.stages:
        for t in open_stage(spec, stage).get_trials(deepcopy=False):
            if t.user_attrs.get("unqueued"):
                continue
            rows.append({
                "stage": t.user_attrs.get("stage", ""), "number": t.number, "state": t.state.name,
                "value": t.value, "epochs": t.user_attrs.get("epochs"),
                "seconds": round(t.duration.total_seconds(), 2) if t.duration else None,
                "retry_of": t.system_attrs.get("failed_trial"), "stopped": t.user_attrs.get("stopped", ""),
                "run": t.user_attrs.get("run", ""), **{k: _unhashable(v) for k, v in t.params.items()},
            })
    return rows


def best_trial(spec: StudySpec) -> dict[str, Any] | None:
    """The best complete trial of the last stage (coarse trials ran fewer epochs and are not comparable)."""
    rows = [r for r in trial_rows(spec) if r["state"] == "COMPLETE" and r["stage"] != "coarse"]
    return max(rows, key=lambda r: r["value"] if spec.objective()[1] else -r["value"]) if rows else None


def write_results(spec: StudySpec) -> dict[str, Any]:
    """trials.csv, best.yaml (a preset), results.json and plots in the study folder."""
    folder = Path(spec.folder)
    rows = trial_rows(spec)
    params = spec.params()
    metric, maximize = spec.objective()
    column = f"val_{metric}"  # each trial's value is the task's primary validation metric, named as such
    keys = ["stage", "number", "state", column, "epochs", "seconds", "retry_of", "stopped", "run",
            *[p.key for p in params]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({(column if k == "value" else k): json.dumps(v) if isinstance(v, list | dict) else v
                    for k, v in r.items()})
    write_text(folder / "trials.csv", buf.getvalue())
    best = best_trial(spec)
    result: dict[str, Any] = {"study": spec.name, "strategy": spec.strategy, "trials": len(rows),
                              "metric": column, "maximize": maximize, "states": {}, "best": None, "warnings": []}
    for r in rows:
        result["states"][r["state"]] = result["states"].get(r["state"], 0) + 1
    if best is not None:
        values = {p.key: best[p.key] for p in params if p.key in best}
        cfg = trial_config(spec, values, best["epochs"] or spec.epochs)
        cfg.log.every = Config.from_dict(copy.deepcopy(spec.base), "study config").log.every
        write_yaml(folder / "best.yaml", cfg.anchored().to_dict())
        result["best"] = {"number": best["number"], "stage": best["stage"], column: best["value"],
                          "params": values, "run": best["run"]}
        result["warnings"] = edge_warnings(params, values)
        if task_class(cfg.task.name).class_scores and best["run"] and (Path(best["run"]) / "summary.json").is_file():
            others = sorted((r for r in rows if r["state"] == "COMPLETE" and r["stage"] == best["stage"]
                             and r["number"] != best["number"]), key=lambda r: -r["value"])
            n_val = int(Run(best["run"]).summary.get("n_val") or 0)
            if w := noise_warning(best, others[0] if others else None, n_val):
                result["warnings"].append(w)
    write_json(folder / "results.json", result)
    if any(r["state"] == "COMPLETE" for r in rows):
        write_bytes(folder / "scatter.png", _scatter_png(rows, params, metric))
        write_bytes(folder / "progress.png", _progress_png(rows, metric, maximize))
    return result


def _axis(metric: str) -> tuple[str, float]:
    """The y label of a metric and the factor its values are drawn at (accuracy in percent)."""
    return ("val accuracy (%)", 100.0) if metric == "acc" else (f"val {metric}", 1.0)


def _scatter_png(rows: list[dict[str, Any]], params: list[Param], metric: str) -> bytes:
    from .plotting import figure_png, pyplot

    plt = pyplot()
    done = [r for r in rows if r["state"] == "COMPLETE"]
    label, scale = _axis(metric)
    n = len(params)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(n / cols)), squeeze=False)
    for ax, p in zip(axes.flat, params, strict=False):
        stages = sorted({r["stage"] for r in done})
        for stage in stages:
            pts = [(r[p.key], r["value"]) for r in done if r["stage"] == stage and p.key in r]
            if p.kind == "categorical":
                labels = [json.dumps(c) if isinstance(c, list) else str(c) for c in p.choices]
                xs = [labels.index(json.dumps(x) if isinstance(x, list) else str(x)) for x, _ in pts]
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
            else:
                xs = [x for x, _ in pts]
            ax.scatter(xs, [y * scale for _, y in pts], s=18, alpha=0.8, label=stage)
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(stages) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{label.removesuffix(' (%)')} against each hyperparameter")
    fig.tight_layout()
    return figure_png(fig, dpi=100)


def _progress_png(rows: list[dict[str, Any]], metric: str, maximize: bool) -> bytes:
    from .plotting import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    label, scale = _axis(metric)
    xs = list(range(1, len(done) + 1))
    ys = [r["value"] * scale for r in done]
    ax.scatter(xs, ys, s=16, label="trial")
    ax.plot(xs, (np.maximum if maximize else np.minimum).accumulate(ys), color="C1", label="best so far")
    ax.set_xlabel("completed trial")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig, dpi=100)


def final(spec: StudySpec, out: str | Path | None = None):
    """Retrain the best config and evaluate it on the test split, once."""
    from .fit import Trainer

    folder = Path(spec.folder)
    if not (folder / "best.yaml").is_file():
        write_results(spec)
    if not (folder / "best.yaml").is_file():
        raise VisrecError(f"study {spec.name!r} has no completed trial to retrain")
    cfg = resolve_config(str(folder / "best.yaml"))
    if out is None:
        out, i = folder / "final", 2
        while (out / "config.yaml").exists():
            out, i = folder / f"final-{i}", i + 1
    return Trainer(cfg, out=out, quiet=True).fit()


def leaderboard(spec: StudySpec, top: int = 10) -> list[dict[str, Any]]:
    rows = [r for r in trial_rows(spec) if r["state"] == "COMPLETE"]
    sign = 1 if spec.objective()[1] else -1
    return sorted(rows, key=lambda r: (r["stage"] != "coarse" or len(spec.stages) == 1, sign * r["value"]),
                  reverse=True)[:top]


def tune(data: str, **kwargs) -> dict[str, Any]:
    """Create the study, run `workers` workers (default 1), write the results; returns results.json's content."""
    from .distributed import env_world

    if env_world() > 1:
        raise VisrecError("visrec tune does not run under torchrun: a trial trains in one process",
                          "run the search in one process with --workers N, or start more workers on other machines "
                          "against the same --storage (PostgreSQL); train the chosen config with --nproc")
    workers = kwargs.pop("workers", 1)
    spec = create_study(data, **kwargs)
    run_workers(spec, workers)
    return write_results(spec)


if __name__ == "__main__":
    worker_main()
