"""A run's checkpoints as the training loop keeps them (RUN/checkpoints; the format is `visrec.checkpoint`'s).

`Checkpointer` is the Trainer's part for them: `save(tag)` (rank 0 writes, atomically; the other ranks wait),
`save_last()` (the resumable checkpoint: weights, averages, optimizer, schedule, position, RNG streams; refused
when the weights are not finite, so a NaN never replaces the last good one), `restore()` (every part of the
Trainer back where `last` left it), `consider_best(value)` (the best epoch by the task's primary metric) and
`select()` (train.select=best: the best epoch's weights back before the test evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import Normalizer
from ..errors import VisrecError
from .rundir import RunWriter
from .setup import model_spec
from .state import Position, all_finite, capture_rng, now, restore_rng

if TYPE_CHECKING:
    from .loop import Trainer


class Checkpointer:
    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.folder = trainer.run_dir / "checkpoints"

    def meta(self) -> dict[str, Any]:
        """What a checkpoint's JSON holds besides tensors: position, classes, preprocessing, task, the model's spec,
        the schedule, the averages and the augmentation's RNG."""
        t = self.t
        ds = t.ds
        return {
            **t.pos.state(), "saved": now(),
            "classes": ds.classes, "preprocess": t.normalizer.state(), "task": t.task.name,
            "model": model_spec(t.cfg, ds, t.normalizer, t.task.num_outputs(ds)),
            "schedule": t.schedule.state_dict(),
            **t.averages.state(),
            "augment_rng": t.pipeline.get_state()["rng"],
            **({"input": ds.fit.state()} if ds.fit is not None else {}),
        }

    def save(self, tag: str, **kwargs: Any) -> None:
        """Rank 0 writes the checkpoint; the others wait until it is on disk."""
        t = self.t
        if t.dist.main:
            save_checkpoint(self.folder, tag, t.model, self.meta(), extra={"preprocess": t.normalizer.tensors},
                            **kwargs)
        t.dist.barrier()

    def save_last(self) -> None:
        """The resumable checkpoint. Never replaces the last good one with poisoned weights: a NaN can arrive between
        two logged windows (whose losses are checked) and a checkpoint_every save. With train.nonfinite=skip the user
        accepts skipped steps, whose forward passes may still have pushed batch-norm statistics to inf: then only the
        parameters must be finite."""
        t = self.t
        if not all_finite(t.model, params_only=t.cfg.train.nonfinite == "skip"):
            raise t.nonfinite_error(t.pos.step)
        a = t.averages
        self.save("last", ema=a.ema.module if a.ema else None, swa=a.swa.module if a.swa else None,
                  optimizer=t.optimizer, rng=capture_rng(t.pipeline.gen))

    def restore(self) -> None:
        """Every part of the Trainer back where the `last` checkpoint left it."""
        t = self.t
        ckpt = load_checkpoint(self.folder, "last", with_state=True)
        m = ckpt.meta
        if m["classes"] != t.ds.classes:
            raise VisrecError(f"{t.run_dir}: the dataset's classes changed since the run started",
                              f"run had {m['classes']}, data now has {t.ds.classes}")
        t.model.load_state_dict(ckpt.weights)
        t.averages.load(t.model, m, ckpt.ema, ckpt.swa)
        t.optimizer.load_state_dict(ckpt.optimizer)
        t.schedule.load_state_dict(m["schedule"])
        t.normalizer = Normalizer.from_state(m["preprocess"], ckpt.extra.get("preprocess")).to(t.runtime.device)
        restore_rng(ckpt.rng)
        t.pipeline.set_state({"gen": ckpt.rng["augment"], "rng": m["augment_rng"]})
        t.pos = Position.from_state(m)
        if t.planner is not None and t.pos.planned_steps:
            t.plan(t.pos.planned_steps)
        t.writer = RunWriter(t.run_dir, resume_step=t.pos.step, write=t.dist.main)
        if t.dist.active:  # one augmentation stream per rank, continued from the position (any world size)
            t.pipeline.reseed(t.augment_seed() + 7 * t.pos.step)

    def consider_best(self, value: float | None) -> bool:
        """Save `best` when the epoch's primary metric beats every earlier one (None: not measured this epoch)."""
        t = self.t
        pos = t.pos
        if value is None or not t.task.better(value, pos.best_val):
            return False
        pos.best_val, pos.best_epoch = value, pos.epoch + 1
        ema = t.averages.ema
        self.save("best", ema=ema.module if ema else None)
        return True

    def select(self) -> None:
        """train.select=best: the best epoch's weights (and EMA) back in the model before the test evaluation."""
        t = self.t
        if t.cfg.train.select != "best" or t.pos.best_epoch <= 0:
            return
        best = load_checkpoint(self.folder, "best")
        t.model.load_state_dict(best.weights)
        if t.averages.ema is not None and best.ema is not None:
            t.averages.ema.module.load_state_dict(best.ema)
