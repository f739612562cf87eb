"""The training loop: it owns precision, clipping, averaging, checkpoints and timing; observers only watch, and
a task (`visrec.training.task.Task`) says what the targets, the loss and the metrics are.

    trainer = Trainer(cfg, ClassificationTask(cfg), out="runs/x")
    run = trainer.fit()

Most callers want `visrec.train()` or `visrec.Trainer`, which pick the task named in the config.
`Trainer.resume(run_dir, task)` continues a stopped run from its last checkpoint, with the same batches,
augmentation draws and schedule as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Config, parse_duration
from ..data import Dataset, DeviceBatches, Pipeline
from ..data.augment import alternates_flip
from ..data.imageset import move_targets
from ..data.shards import ShardBatches, sequential_shards
from ..data.stream import BadFiles, LoaderBatches
from ..device import (
    Runtime,
    autocast,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
    sync,
    use_channels_last,
)
from ..distributed import DistributedError
from ..errors import VisrecError
from ..evaluate import eval_batch_size
from ..run_store import RunFolder, dataset_from_config, default_run_name
from ..version import __version__
from .averaging import WeightAverages
from .budget import BudgetPlanner
from .callbacks import Callback, ProgressPrinter, TensorBoardLogger, TrainState
from .checkpointer import Checkpointer
from .context import Optimizers, StepContext
from .distill import Teachers
from .finetune import Finetune, cache_dir, cached_features
from .optim import build_optimizer, build_ref_optimizer, l2_penalty
from .rundir import RunWriter
from .schedules import LRSchedule, schedule_factor, snapshot_steps
from .setup import (
    build_model,
    check_config,
    engine_threads,
    epoch_batch_size,
    fit_normalizer,
    rank_device,
    schedule_warnings,
    start_distributed,
    wrap_ddp,
)
from .state import Position, Stopped, now, stop_at_once, stop_signals
from .step import LossStep, NonFiniteLoss, nonfinite_error
from .task import EvalSettings, Evaluation, Task
from .window import Window

# One batch through the network: (uint8 images or features, targets) -> (outputs, loss, targets as augmented).
Forward = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor, Any]]


def detached(out: Any) -> Any:
    """A model's output off the graph: a tensor, or each tensor of a dict (a detector's losses)."""
    if isinstance(out, dict):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out.detach() if isinstance(out, torch.Tensor) else out


def _say(text: str) -> None:
    """A line about the work in progress, on stderr beside the progress output."""
    print(text, file=sys.stderr, flush=True)


class Trainer:
    """Trains one run of one task, described by a resolved Config, into one run folder."""

    def __init__(
        self,
        cfg: Config,
        task: Task,
        *,
        out: str | Path | None = None,
        dataset: Dataset | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool | None = None,
        quiet: bool = False,
        _resume_dir: Path | None = None,
    ):
        check_config(cfg)
        if not isinstance(task, Task):
            raise VisrecError(f"a Trainer needs a Task, got {task!r}",
                              "use visrec.Trainer, which takes the config's task, or pass visrec.tasks.create_task()")
        self.cfg, self.task = cfg, task
        self.dist = start_distributed(cfg)
        self.ds = dataset if dataset is not None else dataset_from_config(cfg)
        task.check(self.ds)
        if _resume_dir is not None:
            self.run_dir = _resume_dir
        else:
            # across processes rank 0 names the folder (a default name holds the time)
            self.run_dir = Path(self.dist.broadcast(
                str(out) if out else str(Path("runs") / default_run_name(cfg.data.name, cfg.model.name))))
            if (self.run_dir / "config.yaml").exists():
                raise VisrecError(f"{self.run_dir} already holds a run",
                                  f"continue it with --resume {self.run_dir}, or choose another --out")
            self.dist.barrier()  # every rank has looked before rank 0 writes config.yaml
        self.extra_callbacks = list(callbacks)
        self.progress = progress
        self.quiet = quiet  # no progress output at all
        self._stop_reason: str | None = None
        self.resuming = _resume_dir is not None
        self._setup()
        if self.resuming:
            self.checkpoints.restore()

    @classmethod
    def resume(cls, run_dir: str | Path, task: Task | None = None, *, callbacks: Sequence[Callback] = (),
               progress: bool | None = None) -> Trainer:
        """A Trainer that continues the run in `run_dir` from its last checkpoint."""
        run = RunFolder(run_dir)
        if run.status == "completed":
            raise VisrecError(f"{run.path} has already completed training", "start a new run instead")
        return cls(run.config, task, callbacks=callbacks, progress=progress, _resume_dir=run.path)

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg, ds, task = self.cfg, self.ds, self.task
        set_threads(cfg.device.threads)
        device = resolve_device("cpu" if cfg.train.engine == "numpy" else cfg.device.name)
        if self.dist.active:
            device = rank_device(self.dist, device, cfg.device.threads)
        self.runtime = Runtime(device, resolve_precision(cfg.device.precision, device))
        seed_everything(cfg.train.seed)
        normalizer = fit_normalizer(cfg, ds).to(device)
        cfg.model.kwargs = {**task.model_kwargs(ds, cfg.model.name), **cfg.model.kwargs}
        # a resumed run's checkpoint holds its weights and preprocessing
        self.model, self.normalizer, self.initial_weights_note = build_model(
            cfg, ds, normalizer, task.num_outputs(ds), load_weights_from_config=not self.resuming)
        task.check_model(self.model, ds)
        self.channels_last = use_channels_last(cfg.model.channels_last, self.model)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.to(device, memory_format=self.memory_format)
        self.params = sum(p.numel() for p in self.model.parameters())
        net = self.model
        if self.dist.active:
            net = wrap_ddp(self.model, cfg, device, find_unused=task.ddp_unused_parameters)
        self.forward = torch.compile(net) if cfg.model.compile else net
        self.finetune = (Finetune.build(self.model, cfg.finetune, ds.channels, ds.image_size)
                         if cfg.finetune.strategy != "none" else None)
        named = None
        if cfg.train.engine != "numpy" and self.finetune is None:
            named = task.optimizers(self.model, lambda part, scale=1.0: build_optimizer(
                part, dataclasses.replace(cfg.optim, lr=cfg.optim.lr * scale)))
        self.optimizer = (Optimizers(named) if named else
                          build_ref_optimizer(self.model, cfg.optim) if cfg.train.engine == "numpy" else
                          build_optimizer(self.model, cfg.optim,
                                          lr_factors=self.finetune.lr_factors() if self.finetune else None))
        bs = epoch_batch_size(cfg.train.batch_size, len(ds.train), cfg.train.min_epoch_steps)
        self.notes: list[str] = []  # what the user should know before training starts
        if bs < min(cfg.train.batch_size, len(ds.train)):
            self.notes.append(f"batch {cfg.train.batch_size} -> {bs}, so that an epoch of {len(ds.train):,} images "
                              f"has {len(ds.train) // bs} steps (train.min_epoch_steps={cfg.train.min_epoch_steps}; "
                              "0 keeps the batch)")
        if self.dist.active and bs % self.dist.world:
            raise VisrecError(f"the batch of {bs} images does not divide among {self.dist.world} processes",
                              f"set train.batch_size to a multiple of {self.dist.world} (the global batch: each "
                              f"process takes batch / {self.dist.world})")
        self.notes += ds.notes
        self.bad_files = None
        if ds.streamed:
            self.batches = self._stream(bs, device)
        else:
            self.batches = DeviceBatches(ds.train.images.to(device), move_targets(task.targets(ds.train), device),
                                         bs, seed=cfg.train.seed, rank=self.dist.rank, world=self.dist.world,
                                         alternate_flip=alternates_flip(cfg.data.augment))
        if self.dist.active:
            d = self.dist
            where = (f"{torch.get_num_threads()} CPU thread(s) each" if device.type == "cpu"
                     else f"one {device.type} each")
            self.notes.append(f"training across {d.world} processes ({d.backend}; {where}): each takes "
                              f"{bs // d.world} of every global batch of {bs}")
        self.steps_per_epoch = len(self.batches)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.epochs_planned = cfg.train.epochs
        self.budget = parse_duration(cfg.train.time_budget)
        self.planner: BudgetPlanner | None = None  # the time budget's plan of the schedule's length
        if self.budget is not None:
            check_budget(cfg)
            self.planner = BudgetPlanner(self.budget, self.steps_per_epoch, mean=self._agreed)
        self.low_res = progressive_shape(cfg, task, ds.image_size)  # checked here, before anything trains
        self.warnings = schedule_warnings(self.total_steps, cfg.train.epochs, self.steps_per_epoch, bs, len(ds.train))
        self.window_losses: list[float] = []  # of every logged window: the end compares the last with the first
        a = cfg.average
        self.averages = WeightAverages(self.model, ema=a.ema, swa=a.swa, swa_every=a.swa_every,
                                       total_steps=self.total_steps)
        self.schedule = LRSchedule(self.optimizer, self._lr_factor())
        self.pipeline = Pipeline(cfg.data.augment, device, seed=self.augment_seed(), normalizer=self.normalizer,
                                 images=ds.train.images)
        self.lbfgs_l2 = None
        if cfg.optim.name == "lbfgs":
            check_lbfgs(cfg, self.model, bs, len(ds.train))
            self.lbfgs_l2 = l2_penalty(self.model, cfg.optim.weight_decay, cfg.optim.decay_all)
        self.snapshots = set(snapshot_steps(cfg.schedule, self.total_steps, self.steps_per_epoch))
        d = cfg.distill
        if d.teachers and not task.distills:
            raise VisrecError(f"distillation matches class probabilities, and task {task.name} does not output class "
                              "scores", "leave out distill.teachers (distill classification runs)")
        if cfg.finetune.strategy == "linear" and not task.linear_probe:
            raise VisrecError(f"finetune.strategy=linear trains the classifier alone on cached features, and task "
                              f"{task.name}'s head is more than a classifier", "use finetune.strategy=last or full")
        teachers = Teachers(d.teachers, ds, self.normalizer, device, d.temperature, d.alpha) if d.teachers else None
        self.loss_step = LossStep(task, self.model, teachers, device=device, amp_dtype=self.runtime.amp_dtype)
        eval_bs = eval_batch_size(cfg.eval.batch_size, device, ds.train.images.shape[1:])
        self.eval_settings = EvalSettings(eval_bs, self.channels_last, self.runtime.amp_dtype,
                                          shard=self.dist if self.dist.active else None,
                                          say=None if self.quiet or not self.dist.main else _say)
        self.pos = Position()
        self.writer = RunWriter(self.run_dir, write=self.dist.main)
        self.checkpoints = Checkpointer(self)
        self.probe_features: dict[str, Any] = {}  # the linear probe's feature extraction: cache hit, seconds

    def _stream(self, bs: int, device: torch.device) -> LoaderBatches | ShardBatches:
        """Training batches read from the files by worker processes (the training set streams: data.cache)."""
        cfg, ds = self.cfg, self.ds
        if alternates_flip(cfg.data.augment):
            raise VisrecError("altflip mirrors each image in alternate epochs, which needs the images in memory, and "
                              "this training set streams from its files", "use hflip, or data.cache=disk")
        self.bad_files = ds.bad or BadFiles(len(ds.train), cfg.data.max_bad_fraction)
        kw = {"device": device, "seed": cfg.train.seed, "rank": self.dist.rank, "world": self.dist.world,
              "workers": cfg.data.workers, "scale": tuple(cfg.data.crop_scale), "ratio": tuple(cfg.data.crop_ratio),
              "bad": self.bad_files}
        images, targets, how = ds.train.images, self.task.targets(ds.train), "their files"
        if sequential_shards(cfg.data.shard_read, images.paths):
            batches = ShardBatches(images, targets, bs, buffer=cfg.data.shuffle_buffer, **kw)
            how = (f"{len(batches.stream.shards)} shard(s), each worker its own, whole, through a shuffle buffer of "
                   f"{cfg.data.shuffle_buffer}")
        else:
            batches = LoaderBatches(images, targets, bs, random_crops=self.task.random_crops, **kw)
        fit = images.fit
        crops = (f"random-resized crops to {fit.width}x{fit.height}" if self.task.random_crops
                 else f"each image {fit.describe()}")
        self.notes.append(f"reading {len(ds.train):,} training images from {how} with {batches.workers} "
                          f"worker process(es) (data.workers): {crops}; evaluation {fit.describe()}")
        return batches

    def _lr_factor(self):
        """The schedule's factor per step: restarted when a two-stage fine-tune unfreezes the network, and held
        at average.swa_lr during SWA when that is set."""
        cfg, total, spe = self.cfg, self.total_steps, self.steps_per_epoch
        if self.finetune is not None and cfg.finetune.strategy == "two_stage":
            t1 = cfg.finetune.head_epochs * spe
            head, body = schedule_factor(cfg.schedule, t1, spe), schedule_factor(cfg.schedule, total - t1, spe)

            def base(t: int) -> float:
                return head(t) if t < t1 else body(t - t1)
        else:
            base = schedule_factor(cfg.schedule, total, spe)
        start = self.averages.swa_start
        if start is not None and cfg.average.swa_lr > 0:
            hold = cfg.average.swa_lr
            return lambda t: hold if t >= start else base(t)
        return base

    # ------------------------------------------------------------------ checkpoints

    def augment_seed(self) -> int:
        """Initialization is seeded alike on every rank; augmentation differs per rank."""
        return self.cfg.train.seed + 1 + 7919 * self.dist.rank

    def nonfinite_error(self, step: int) -> NonFiniteLoss:
        return nonfinite_error(self.cfg, self.cfg.optim.lr * self.schedule.factor(step - 1), step,
                               self.pos.epoch + 1, self.run_dir / "checkpoints")

    # ------------------------------------------------------------------ observers and evaluation

    def _state(self, epoch: int | None = None) -> TrainState:
        """`epoch` (1-based) defaults to the epoch in progress."""
        epoch = epoch if epoch is not None else min(self.pos.epoch + 1, self.epochs_planned)
        return TrainState(self.run_dir, epoch, self.epochs_planned, self.pos.step, self.total_steps,
                          self.steps_per_epoch, self.pos.train_seconds, self.model, self.optimizer, self.stop,
                          self.task.primary)

    def stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step, as Ctrl-C does (observers get this as request_stop)."""
        self._stop_reason = reason

    def _final(self) -> bool:
        return self.pos.epoch + 1 >= self.epochs_planned

    def _budget_clock(self, t_epoch: float, seconds_before: float) -> None:
        """The time budget's clock starts after this process's first step (which pays for allocations and warm-up);
        its first plan comes five steps later; logged windows refine it (`_replan`)."""
        sync(self.runtime.device)
        now = seconds_before + (time.perf_counter() - t_epoch)
        if not self.planner.started:
            self.planner.start(self.pos.step, now)
        else:
            self._replan(now, force=True)

    def _agreed(self, value: float) -> float:
        """Across processes, the ranks' mean of a number (so that every rank plans alike)."""
        if not self.dist.active:
            return value
        return float(self.dist.mean(torch.tensor([value], device=self.runtime.device)).item())

    def plan(self, total_steps: int) -> None:
        """Set the schedule's length (a time budget's estimate): the epochs follow, the last one maybe partial."""
        self.total_steps = max(1, total_steps)
        self.epochs_planned = -(-self.total_steps // self.steps_per_epoch)
        self.pos.planned_steps = self.total_steps
        self.schedule.replace(self._lr_factor())

    def _replan(self, train_seconds: float, force: bool = False) -> None:
        total = self.planner.plan(self.pos.step, train_seconds, self.total_steps, force=force)
        if total is not None:
            self.plan(total)

    def _eval_model(self) -> torch.nn.Module:
        """The weights the run is judged by: SWA over EMA over raw."""
        return list(self.averages.models(self.model, self._final()).values())[-1]

    def _evaluate(self, model: torch.nn.Module, split: str) -> Evaluation:
        return self.task.evaluate(model, self.ds.split(split), self.normalizer, split=split,
                                  settings=self.eval_settings)

    # ------------------------------------------------------------------ fit

    def fit(self, *, stop_after_steps: int | None = None, test: bool = True) -> RunFolder:
        """Train to the end (or until stopped), evaluate on test, and return the run folder.

        `stop_after_steps` stops after that many optimizer steps in total, exactly as a Ctrl-C would:
        a resumable checkpoint is saved and the run's status is `interrupted`. `test=False` leaves the test
        split untouched (hyperparameter search judges by validation metrics only).
        """
        with engine_threads(self.cfg):
            return self._fit(stop_after_steps, test)

    def _fit(self, stop_after_steps: int | None, test: bool) -> RunFolder:
        self.writer.write_files(self.cfg, self.ds, f"{self.model}\n\nparameters: {self.params:,}\n")
        callbacks: list[Callback] = [self.writer]
        if self.dist.main:  # across processes, rank 0 logs, reports and runs the observers
            callbacks += [
                TensorBoardLogger(self.run_dir / "tb", purge_step=self.pos.step if self.resuming else None,
                                  config=self.cfg.to_dict(), histograms=self.cfg.log.histograms,
                                  activations=not self.cfg.model.compile),
                *([] if self.quiet else [ProgressPrinter(live=self.progress)]),
                *self.extra_callbacks,
            ]
        for cb in callbacks:
            cb.on_train_start(self._state())
        try:
            with stop_signals(self.stop):
                finished = self._train(callbacks, stop_after_steps)
        except (DistributedError, RuntimeError) as e:
            if not self.dist.active:
                why = e.message if isinstance(e, VisrecError) else f"{type(e).__name__}: {e}"
                self._end(callbacks, "failed", None, error=why)
                raise
            # a peer is gone (a collective raised, or DDP's gradient all-reduce): say where, and stop without
            # touching the group again
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            text = e.message if isinstance(e, DistributedError) else (
                f"rank {self.dist.rank} of {self.dist.world}: lost the other processes ({first})")
            err = DistributedError(f"{text} at step {self.pos.step}, epoch {self.pos.epoch + 1}",
                                   "see the other ranks' output for the first error; resume with --resume RUN")
            self._end(callbacks, "failed", None, error=err.message)
            raise err from None
        except BaseException as e:  # record why the run ended, close the loggers, then let it propagate
            why = e.message if isinstance(e, VisrecError) else f"{type(e).__name__}: {e}"
            self._end(callbacks, "failed", None, error=why)
            raise
        if not finished:
            self._end(callbacks, "interrupted", None, error=f"stopped by {self._stop_reason}")
            self.dist.barrier()  # every process returns once rank 0 has written the run
            return RunFolder(self.run_dir)
        self.checkpoints.select()
        try:  # a signal now stops the evaluation at once; the trained weights are in the last checkpoint
            with stop_at_once():
                if test:
                    self.eval_settings.note(f"evaluating the test split ({len(self.ds.test):,} images)")
                result = self._evaluate(self._eval_model(), "test") if test else None
                if result is not None and self.dist.main:
                    result.save(self.run_dir)
        except Stopped as e:
            self._end(callbacks, "interrupted", None,
                      error=f"stopped by {e.signal_name} during the test evaluation; the training is complete and "
                            "saved, resuming evaluates it")
            self.dist.barrier()
            return RunFolder(self.run_dir)
        self._end(callbacks, "completed", result, compared=self._compare_averages(result))
        self.dist.barrier()
        return RunFolder(self.run_dir)

    def _compare_averages(self, result: Evaluation | None) -> dict[str, dict[str, float | None]]:
        """How much averaging gained over the raw weights, in the primary metric on val and test."""
        models = self.averages.models(self.model, True)
        if len(models) == 1:
            return {}
        p, judged, out = self.task.primary, self._eval_model(), {}
        for name, m in models.items():
            out[name] = {f"val_{p}": self._evaluate(m, "val").metrics[p] if self.ds.val is not None else None}
            if result is not None:
                out[name][f"test_{p}"] = (result.metrics[p] if m is judged else self._evaluate(m, "test").metrics[p])
        return out

    def _end(self, callbacks: list[Callback], status: str, test: Evaluation | None, **extra: Any) -> None:
        if isinstance(self.batches, LoaderBatches | ShardBatches):
            self.batches.close()  # the worker processes are done
        summary = self.writer.write_summary(self._summary(status, test, **extra), self.task.primary)
        state = self._state()
        for cb in callbacks:
            cb.on_train_end(state, summary)

    def _train(self, callbacks: list[Callback], stop_after_steps: int | None) -> bool:
        """Every epoch left, on images or (linear probe) on cached features; False when stopped early."""
        if self.finetune is not None and self.cfg.finetune.strategy == "linear":
            batches, forward = self._probe()
        else:
            batches, forward = self.batches, self._image_forward()
        while self.pos.epoch < self.epochs_planned:
            if self.finetune is not None:
                self.finetune.apply(self.model, self.pos.epoch)
            if not self._epoch(batches.epoch(self.pos.epoch, start=self.pos.batch), forward, batches.batch_size,
                               callbacks, stop_after_steps):
                return False
        return True

    def _image_forward(self) -> Forward:
        model, device, amp, mf = self.forward, self.runtime.device, self.runtime.amp_dtype, self.memory_format
        low, until = self.low_res, self.cfg.train.progressive_until

        def inputs(xb: torch.Tensor, yb: Any) -> tuple[torch.Tensor, Any]:
            x = self.normalizer(xb).contiguous(memory_format=mf)
            x, target = self.pipeline(x, yb) if self.pipeline else (x, yb)
            if low is not None and self.pos.step < until * self.total_steps:
                x = F.interpolate(x, size=low, mode="bilinear", antialias=True, align_corners=False
                                  ).contiguous(memory_format=mf)
            return x, target

        def forward(xb: torch.Tensor, yb: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
            x, target = inputs(xb, yb)
            with autocast(device, amp):
                out = self.task.forward(model, x, target)
            return out, self.loss_step(out, target, x), target

        forward.inputs = inputs  # type: ignore[attr-defined]
        return forward

    def _probe(self) -> tuple[DeviceBatches, Forward]:
        """The linear probe: the frozen network's features are extracted once (or read from the cache), then
        only the head trains, on feature batches, through the same epoch loop."""
        self.finetune.apply(self.model, self.pos.epoch)
        t0 = time.perf_counter()
        feats, hit = cached_features(self.model, self.ds.train.images, self.normalizer, cache_dir(self.cfg.finetune),
                                     self.channels_last)
        self.probe_features = {"feature_cache_hit": hit, "feature_seconds": round(time.perf_counter() - t0, 3)}
        device, head = self.runtime.device, self.model.get_classifier()
        batches = DeviceBatches(feats.to(device), self.batches.targets, self.batches.batch_size,
                                seed=self.cfg.train.seed)

        def forward(fb: torch.Tensor, yb: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
            out = head(fb)
            return out, self.loss_step(out, yb), yb

        return batches, forward

    def _lbfgs_step(self, opt, forward: Forward, xb: torch.Tensor, yb: Any, params: list, clip: float):
        """One L-BFGS step: its line search calls the closure (forward, objective, backward) several times; the
        last call's outputs are the step's."""
        last: dict[str, Any] = {}

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            out, loss, target = forward(xb, yb)
            objective = loss + self.lbfgs_l2() if self.lbfgs_l2 is not None else loss
            objective.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            last.update(out=out, loss=loss, target=target)
            return objective

        opt.step(closure)
        return last["out"], last["loss"], last["target"]

    def _epoch(self, batches: Iterable[tuple[torch.Tensor, Any]], forward: Forward, bs: int,
               callbacks: list[Callback], stop_after_steps: int | None) -> bool:
        """One epoch from the current position: the loop's core. False when stopped before its end."""
        cfg, pos, opt, device = self.cfg, self.pos, self.optimizer, self.runtime.device
        log_every, clip, skip_bad = cfg.log.every, cfg.optim.grad_clip, cfg.train.nonfinite == "skip"
        noise, noise_gamma = cfg.optim.grad_noise, cfg.optim.grad_noise_gamma
        params = list(self.model.parameters())  # frozen ones have no gradient and are skipped
        ep_loss, ep_steps = torch.zeros((), device=device), 0
        ep_stats = torch.zeros(len(self.task.stats), device=device)
        win = Window(pos.step)
        t_epoch = time.perf_counter()
        seconds_before = pos.train_seconds
        ep_data = 0.0  # seconds spent waiting for batches (wall clock: no device sync)
        ctx = StepContext(self.forward, self.model, opt, forward, getattr(forward, "inputs", lambda x, y: (x, y)),
                          device, self.runtime.amp_dtype, pos.step, params, clip, noise, noise_gamma, skip_bad)
        feed = iter(batches)
        while True:
            t_wait = time.perf_counter()
            try:
                xb, yb = next(feed)
            except StopIteration:
                break
            waited = time.perf_counter() - t_wait
            win.data_seconds += waited
            ep_data += waited
            # ---- hot path: no host syncs here ----
            if isinstance(opt, torch.optim.LBFGS):
                out, loss, target = self._lbfgs_step(opt, forward, xb, yb, params, clip)
                stepped = True
            else:
                ctx.step = pos.step
                out, loss, target, stepped = self.task.train_step(xb, yb, ctx)
                if not stepped:
                    pos.skipped_steps += 1
            self.averages.after_step(self.model, pos.step + 1, stepped)
            self.schedule.step()
            pos.step += 1
            pos.batch += 1
            if self.planner is not None and self.planner.due(pos.step):
                self._budget_clock(t_epoch, seconds_before)
            if pos.step in self.snapshots:
                t0 = time.perf_counter()
                k = sorted(self.snapshots).index(pos.step) + 1  # the weights at the end of a learning-rate cycle
                self.checkpoints.save(f"snapshot{k}")
                t_epoch += time.perf_counter() - t0  # saving is not training time
            win.add(loss, self.task.batch_stats(detached(out), target))
            ep_steps += 1
            # ---- end of hot path ----
            last_in_epoch = pos.batch == self.steps_per_epoch or pos.step >= self.total_steps
            stop = stop_after_steps is not None and pos.step >= stop_after_steps
            if not self.dist.active:  # across processes a signal is agreed on at the window's end
                stop = stop or self._stop_reason is not None
            if pos.step % log_every == 0 or last_in_epoch or stop:
                losses, finite, sums = win.reduce(self.dist)
                if not skip_bad and not bool(finite.all()):  # host sync, once per window
                    raise self.nonfinite_error(win.first_nonfinite_step(finite))
                sync(device)
                t = time.perf_counter()
                pos.train_seconds = seconds_before + (t - t_epoch)
                ep_loss += losses[finite].sum()
                ep_stats += sums
                rec = win.record(epoch=pos.epoch + 1, step=pos.step, batch_size=bs, losses=losses, finite=finite,
                                 stat_fields=lambda n, sums=sums: self._stat_fields(sums, n), lr=self.schedule.lr,
                                 seconds=pos.train_seconds, now=t)
                self.window_losses.append(rec["loss"])
                for cb in callbacks:
                    cb.on_window(self._state(), rec)
                if self.planner is not None and self.planner.started:
                    self._replan(pos.train_seconds)
                win = Window(pos.step)
                # a signal that came while logging; across processes, any rank's signal stops them all
                reached = stop_after_steps is not None and pos.step >= stop_after_steps
                stop = self.dist.any(stop or self._stop_reason is not None, device)
                if stop and self._stop_reason is None and not reached:
                    self._stop_reason = "another process was stopped"
            if cfg.train.checkpoint_every and pos.step % cfg.train.checkpoint_every == 0 and not last_in_epoch:
                t0 = time.perf_counter()
                self.checkpoints.save_last()
                t_epoch += time.perf_counter() - t0  # saving is not training time
            if stop:
                self._stop_reason = self._stop_reason or f"stop_after_steps={stop_after_steps}"
                self.checkpoints.save_last()
                return False
            if pos.step >= self.total_steps:  # the budget is spent: this epoch ends here
                break
        sync(device)
        if ep_steps:
            pos.train_seconds = seconds_before + (time.perf_counter() - t_epoch)
        self._end_epoch(callbacks, ep_loss, ep_stats, ep_steps, bs, pos.train_seconds - seconds_before, ep_data)
        return True

    def _stat_fields(self, sums: torch.Tensor, n: int) -> dict[str, float]:
        return {name: v / n for name, v in zip(self.task.stats, sums.tolist(), strict=True)}  # one host sync

    def _end_epoch(self, callbacks, ep_loss, ep_stats, ep_steps: int, bs: int, ep_seconds: float,
                   data_seconds: float = 0.0) -> None:
        pos, records = self.pos, []
        if ep_steps:
            n = ep_steps * bs
            records.append({"epoch": pos.epoch + 1, "step": pos.step, "split": "train", "kind": "epoch",
                            "loss": ep_loss.item() / ep_steps, **self._stat_fields(ep_stats, n),
                            "lr": self.schedule.lr, "seconds": round(pos.train_seconds, 3),
                            "images_per_s": n / max(ep_seconds, 1e-9),
                            "data_share": round(min(1.0, data_seconds / max(ep_seconds, 1e-9)), 4)})
        self.averages.end_epoch(self.model, pos.step, self._final(), self.ds.train.images, self.normalizer,
                                self.eval_settings.batch_size, forward=self.task.statistics_forward)
        if self.ds.val is not None:
            try:
                r = self._evaluate(self._eval_model(), "val")
            except Exception:
                pos.epoch, pos.batch = pos.epoch + 1, 0
                self.checkpoints.save_last()  # the epoch's training is kept: --resume goes on from its end, unvalidated
                raise
            records.append({"epoch": pos.epoch + 1, "step": pos.step, "split": "val", "kind": "epoch",
                            **r.metrics, "lr": self.schedule.lr, "seconds": round(pos.train_seconds, 3)})
            # a task may measure its primary metric every few epochs only (eval.fid_every)
            self.checkpoints.consider_best(r.metrics.get(self.task.primary))
        pos.epoch += 1
        pos.batch = 0
        self.checkpoints.save_last()
        state = self._state(epoch=pos.epoch)
        for cb in callbacks:
            cb.on_epoch_end(state, records)

    # ------------------------------------------------------------------ summary

    def _learned_nothing(self, test: Evaluation | None) -> list[str]:
        """Plain warnings for a run that ended where it began: its loss near the first value, or (the task's
        judgement) its test metric at chance."""
        out = []
        w = self.window_losses  # three windows at least: the first and the last must not be the same stretch
        first, last = (w[0], w[-1]) if len(w) >= 3 else (None, None)
        falls = self.task.loss_falls  # a GAN's loss is a contest: it need not fall
        if falls and first is not None and math.isfinite(first) and math.isfinite(last) and last >= 0.98 * first:
            out.append(f"the training loss stayed near its first value ({first:.4g} -> {last:.4g}): the model "
                       "learned almost nothing. Run `visrec doctor` on the same settings for the cause and the fix")
        if test is not None and (chance := self.task.at_chance(test, self.ds)):
            out.append(f"{chance}. Run `visrec doctor` on the same settings for the cause and the fix")
        return out

    def _summary(self, status: str, test: Evaluation | None, error: str | None = None,
                 compared: dict[str, dict[str, float | None]] | None = None) -> dict[str, Any]:
        cfg, ds, pos, p = self.cfg, self.ds, self.pos, self.task.primary
        summary: dict[str, Any] = {
            "status": status,
            "task": self.task.name,
            "primary_metric": p,
            "maximize": self.task.maximize,
            "dataset": ds.name,
            "model": cfg.model.name,
            "params": self.params,
            "num_classes": ds.num_classes,
            "epochs": pos.epoch,
            "epochs_planned": self.epochs_planned,
            **({"time_budget_seconds": self.budget, "planned_steps": self.total_steps} if self.budget else {}),
            "steps": pos.step,
            "train_seconds": round(pos.train_seconds, 3),
            "images_per_s": round(pos.step * self.batches.batch_size / pos.train_seconds, 1)
            if pos.train_seconds > 0 else None,
            **{f"test_{k}": v for k, v in (test.metrics if test else {}).items()},
            f"test_{p}": test.metrics[p] if test else None,
            f"best_val_{p}": pos.best_val,
            "best_epoch": pos.best_epoch or None,
            "eval_weights": cfg.train.select + self.averages.label(),
            "skipped_steps": pos.skipped_steps,
            "n_train": len(ds.train), "n_val": len(ds.val) if ds.val is not None else 0, "n_test": len(ds.test),
            "device": str(self.runtime.device),
            "engine": cfg.train.engine,
            "precision": str(self.runtime.amp_dtype).replace("torch.", "") if self.runtime.amp_dtype else "fp32",
            "channels_last": self.channels_last,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "visrec": __version__,
            "python": platform.python_version(),
            "started": pos.started,
            "finished": now(),
        }
        summary.update(self.task.summary_fields(test))
        summary["batch_size"] = self.batches.batch_size
        if "input" in ds.splits:  # how the files became images: the cache mode and the evaluation transform
            summary["data_input"] = dict(ds.splits["input"])
            if isinstance(self.batches, LoaderBatches | ShardBatches):  # its workers, and the samples rank 0 read
                summary["data_input"].update(workers=self.batches.workers, read_by_rank0=self.batches.read)
        if self.bad_files is not None and self.bad_files.found:
            summary["skipped_files"] = self.bad_files.rows()
        warnings = [*self.warnings]
        if status == "completed":
            warnings += self._learned_nothing(test)
        if warnings:
            summary["warnings"] = warnings
        if compared:
            summary["weights_compared"] = compared
        if self.snapshots:
            summary["snapshots"] = [f"snapshot{k + 1}" for k in range(len(self.snapshots))]
        if self.finetune is not None:
            summary["finetune"] = {"strategy": cfg.finetune.strategy, "plan": self.finetune.describe(),
                                   "source": cfg.model.weights or cfg.model.name, **self.probe_features}
        if self.loss_step.teachers is not None:
            summary["distill"] = {"teachers": cfg.distill.teachers, "temperature": cfg.distill.temperature,
                                  "alpha": cfg.distill.alpha}
        if test is not None:
            summary["test"] = test.to_dict()
        if error:
            summary["error"] = error
        return summary


def progressive_shape(cfg: Config, task: Task, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """The (H, W) that train.progressive_size trains at first, or None when it is off."""
    low = cfg.train.progressive_size
    if not low:
        return None
    h, w = image_size
    if not task.progressive_resize:
        raise VisrecError(f"train.progressive_size is for tasks whose targets do not move with the pixels, and this "
                          f"is a {task.name} run (its targets are in the images' pixels)",
                          "set train.progressive_size=0")
    if cfg.data.normalize in ("pca", "pca_whiten", "zca"):
        raise VisrecError(f"train.progressive_size needs images, and data.normalize={cfg.data.normalize} turns them "
                          "into feature vectors", "use data.normalize=channel (or the convnet's whitening stem)")
    if low >= min(h, w):
        raise VisrecError(f"train.progressive_size={low} is not below the images' shorter side ({min(h, w)} px)",
                          f"use a smaller size, such as {max(8, round(min(h, w) * 0.7))}, or 0 for off")
    scale = low / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def check_budget(cfg: Config) -> None:
    """What a time budget cannot plan: averages and snapshots placed at fixed fractions of a known length."""
    clash = [k for k, on in (("average.swa", cfg.average.swa > 0),
                             ("schedule.name=cyclic_cosine", cfg.schedule.name == "cyclic_cosine"),
                             ("optim.name=lbfgs", cfg.optim.name == "lbfgs")) if on]
    if clash:
        raise VisrecError(f"train.time_budget={cfg.train.time_budget} cannot be combined with {', '.join(clash)}: "
                          "they are placed at fixed points of a schedule whose length the budget keeps changing",
                          "set train.epochs instead of the budget, or leave those out")


def check_lbfgs(cfg: Config, model: torch.nn.Module, batch: int, n_train: int) -> None:
    """L-BFGS needs a deterministic objective ("disable all sources of noise"): refuse what makes it noisy, unless
    optim.lbfgs_noisy=true."""
    if cfg.optim.lbfgs_noisy:
        return
    noisy = []
    if batch < n_train:
        noisy.append(f"minibatches ({batch} of {n_train} images per step; full batch: --batch-size {n_train} "
                     "--set train.min_epoch_steps=0)")
    if cfg.data.augment:
        noisy.append(f"augmentation ({', '.join(cfg.data.augment)}; --set data.augment=[])")
    from ..models.layers import DropConnectLinear

    drops = [type(m).__name__ for m in model.modules()
             if isinstance(m, torch.nn.modules.dropout._DropoutNd | DropConnectLinear) and m.p > 0]
    if drops:
        noisy.append(f"dropout in the model ({', '.join(sorted(set(drops)))}; e.g. --set model.kwargs.dropout=0)")
    if cfg.optim.grad_noise > 0:
        noisy.append("gradient noise (optim.grad_noise)")
    if noisy:
        raise VisrecError("optim.name=lbfgs needs a deterministic objective, and this run has " + "; ".join(noisy),
                          "remove them as shown, or --set optim.lbfgs_noisy=true to use L-BFGS anyway")
