"""Workers: processes that take queued trials until none is left, each trial a visrec run whose heartbeat marks
it alive; `python -m visrec.tune` is one worker."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import VisrecError
from .space import parse_space, task_class
from .study import StudySpec, _advance, _quiet_optuna, _state_counts, load_spec, open_stage


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

        from ..fit import Trainer
        from ..runs import dataset_from_config
        from ..training import NonFiniteLoss

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
