"""Training as users call it: the task named in the config, the loop, and the report observer attached.

    run = visrec.train("digits", model="convnet", epochs=3)
    trainer = visrec.Trainer(cfg, out="runs/x"); trainer.fit()
    visrec.resume("runs/x")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import Config
from .data import Dataset
from .report import ReportWriter
from .runs import Run, setup_config
from .tasks import create_task
from .training import loop
from .training.callbacks import Callback
from .training.task import Task


class Trainer(loop.Trainer):
    """`visrec.training.Trainer` with the config's task (`task.name`) unless one is given, and report.html
    written at the end when `train.report` is on (after every other observer, so the doctor's findings are in)."""

    def __init__(self, cfg: Config, task: Task | None = None, *, out: str | Path | None = None,
                 dataset: Dataset | None = None, callbacks: Sequence[Callback] = (), progress: bool | None = None,
                 quiet: bool = False, _resume_dir: Path | None = None):
        observers = [*callbacks, *([ReportWriter()] if cfg.train.report else [])]
        super().__init__(cfg, task or create_task(cfg.task.name, cfg), out=out, dataset=dataset, callbacks=observers,
                         progress=progress, quiet=quiet, _resume_dir=_resume_dir)


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


def resume(run_dir: str | Path, *, callbacks: Sequence[Callback] = (), progress: bool | None = None) -> Run:
    """Continue a stopped run from its last checkpoint."""
    return Trainer.resume(run_dir, callbacks=callbacks, progress=progress).fit()
