"""Training as users call it: the task named in the config, the loop, and the report observer attached.

    run = visrec.train("digits", model="convnet", epochs=3)
    trainer = visrec.Trainer(cfg, out="runs/x"); trainer.fit()
    visrec.resume("runs/x")
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config
from .data import Dataset
from .errors import VisrecError
from .report import ReportWriter
from .runs import Run, default_run_name, setup_config
from .tasks import create_task
from .training import loop
from .training.callbacks import Callback
from .training.task import Task


class Trainer(loop.Trainer):
    """`visrec.training.Trainer` with the config's task (`task.name`) unless one is given, and report.html
    written at the end when `log.report` is on (after every other observer, so the doctor's findings are in)."""

    def __init__(self, cfg: Config, task: Task | None = None, *, out: str | Path | None = None,
                 dataset: Dataset | None = None, callbacks: Sequence[Callback] = (), progress: bool | None = None,
                 quiet: bool = False, _resume_dir: Path | None = None):
        observers = [*callbacks, *([ReportWriter()] if cfg.log.report else [])]
        super().__init__(cfg, task or create_task(cfg.task.name, cfg), out=out, dataset=dataset, callbacks=observers,
                         progress=progress, quiet=quiet, _resume_dir=_resume_dir)

    def fit(self, *, stop_after_steps: int | None = None, test: bool = True) -> Run:
        """Train (see visrec.training.Trainer.fit) and return the run folder as the run API's Run (predict,
        evaluate)."""
        return Run(super().fit(stop_after_steps=stop_after_steps, test=test).path)


def train(
    data: str | Dataset | None = None,
    *,
    model: str | None = None,
    task: str | Task | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    out: str | Path | None = None,
    config: Config | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
) -> Run:
    """Train a model and return its Run. Arguments override the preset, which overrides the defaults.

    Example (about ten seconds on a laptop CPU)::

        run = visrec.train("digits", model="convnet", epochs=3, overrides={"train.batch_size": 64})
        run.summary["test_acc"], run.path
    """
    cfg, dataset = setup_config(data, preset=preset, overrides=overrides, config=config, model_name=model,
                                task_name=task if isinstance(task, str) else None, train_epochs=epochs,
                                train_batch_size=batch_size, optim_lr=lr, train_seed=seed)
    given = task if isinstance(task, Task) else None
    return Trainer(cfg, given, out=out, dataset=dataset, callbacks=callbacks, progress=progress).fit()


def train_seeds(config: Config, seeds: Sequence[int], *, out: str | Path | None = None, dataset: Dataset | None = None,
                callbacks: Callable[[int], Sequence[Callback]] | None = None, progress: bool | None = None,
                on_start: Callable[[Trainer], None] | None = None) -> list[Run]:
    """Train one run of `config` per seed, into `OUT-seedN` folders, as members of an ensemble
    (`visrec ensemble OUT-seed1 OUT-seed2 ...`). Only `train.seed` differs between them: the data, its splits
    (`data.split_seed`) and the recipe are the same, and the dataset is loaded once.

    `callbacks(seed)` makes each run's observers (stateful ones must not be shared); `on_start(trainer)` is
    called before each run trains."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise VisrecError(f"seeds {seeds} must be one or more distinct integers", "for example --seeds 1,2,3")
    base = Path(out) if out is not None else Path("runs") / default_run_name(config.data.name, config.model.name)
    runs = []
    for seed in seeds:
        cfg = copy.deepcopy(config)
        cfg.train.seed = seed
        trainer = Trainer(cfg, out=f"{base}-seed{seed}", dataset=dataset, progress=progress,
                          callbacks=callbacks(seed) if callbacks else ())
        dataset = trainer.ds
        if on_start:
            on_start(trainer)
        runs.append(trainer.fit())
        if runs[-1].summary.get("status") == "interrupted":
            break  # a stopped member stops the rest: resume it, then train the others
    return runs


def evaluate_run(run_dir: str | Path, split: str = "test", *, which: str = "auto", device: str = "auto"):
    """A run's split evaluated by its own task (`visrec eval` of a run whose task is not classification, which
    `Run.evaluate` covers with test-time augmentation and the confusion matrix)."""
    from .device import resolve_precision, use_channels_last
    from .evaluate import eval_batch_size
    from .tasks import task_of_run
    from .training.task import EvalSettings

    run = Run(run_dir)
    cfg = run.config
    if split not in ("test", "val", "train"):
        raise VisrecError(f"split {split!r} is not valid", "use test, val or train")
    task, ds = task_of_run(run)
    if split == "val" and ds.val is None:
        raise VisrecError(f"{run.path} was trained without a validation split (data.val_fraction=0)")
    lm = run.load_model(which, device)
    dev = next(lm.model.parameters()).device
    data = ds.split(split)
    settings = EvalSettings(eval_batch_size(cfg.eval.batch_size, dev, data.images.shape[1:]),
                            use_channels_last(cfg.model.channels_last, lm.model),
                            resolve_precision(cfg.device.precision, dev))
    return task.evaluate(lm.model, data, lm.normalizer, split=split, settings=settings)


def resume(run_dir: str | Path, *, callbacks: Sequence[Callback] = (), progress: bool | None = None) -> Run:
    """Continue a stopped run from its last checkpoint."""
    return Trainer.resume(run_dir, callbacks=callbacks, progress=progress).fit()
