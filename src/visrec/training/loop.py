"""The training loop: it owns precision, clipping, EMA, checkpoints and timing; observers only watch.

    trainer = Trainer(resolve_config(preset="quick"), out="runs/x")
    run = trainer.fit()

`Trainer.resume(run_dir)` continues a stopped run from its last checkpoint, with the same batches,
augmentation draws and schedule as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..config import Config
from ..data import Dataset, DeviceBatches, Normalizer, Pipeline
from ..data.augment import MixedTargets
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
from ..errors import VisrecError, unknown_name
from ..evaluate import EvalResult, evaluate, resolve_crop_pad, resolve_tta
from ..io import write_json, write_text, write_yaml
from ..models import create_model, is_file_model
from ..models.layers import PatchWhitening
from ..runs import Run, dataset_from_config, default_run_name, setup_config
from .averaging import EMA, SWA, recompute_batchnorm
from .callbacks import Callback, MetricsLogger, ProgressPrinter, TensorBoardLogger, TrainState
from .checkpoint import load_checkpoint, save_checkpoint
from .distill import Teachers
from .losses import build_loss
from .optim import build_optimizer
from .schedules import LRSchedule, schedule_factor, snapshot_steps


class NonFiniteLoss(VisrecError):
    """Training met a NaN or infinite loss."""


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _check_config(cfg: Config) -> None:
    t = cfg.train
    for key, value, low in (("train.epochs", t.epochs, 1), ("train.batch_size", t.batch_size, 1),
                            ("train.log_every", t.log_every, 1), ("eval.batch_size", cfg.eval.batch_size, 1),
                            ("train.checkpoint_every", t.checkpoint_every, 0)):
        if value < low:
            raise VisrecError(f"{key}={value} must be >= {low}")
    if t.nonfinite not in ("stop", "skip"):
        raise unknown_name("value of train.nonfinite", t.nonfinite, ["stop", "skip"])
    if t.select not in ("last", "best"):
        raise unknown_name("value of train.select", t.select, ["last", "best"])
    resolve_tta(cfg.eval.tta, cfg.data.augment)
    resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment)
    if not 0.0 <= t.ema < 1.0:
        raise VisrecError(f"train.ema={t.ema} must be in [0, 1) (0 = off; typical 0.999)")
    if t.select == "best" and cfg.data.val_fraction == 0:
        raise VisrecError("train.select=best needs a validation split", "set data.val_fraction > 0 or select=last")
    if not 0.0 <= t.swa < 1.0:
        raise VisrecError(f"train.swa={t.swa} must be in [0, 1): the final fraction of training that is averaged",
                          "for example --set train.swa=0.25 (0 = off)")
    if t.swa_lr < 0 or t.swa_every < 0:
        raise VisrecError(f"train.swa_lr={t.swa_lr} and train.swa_every={t.swa_every} must be >= 0")
    if t.swa > 0 and t.select == "best":
        raise VisrecError("train.swa averages the final part of training; it does not combine with train.select=best",
                          "use train.select=last with SWA")
    if cfg.distill.teachers and cfg.loss.name != "cross_entropy":
        raise VisrecError(f"distillation learns from probabilities: it needs loss.name=cross_entropy, not "
                          f"{cfg.loss.name!r}")
    from ..transfer import check_finetune

    check_finetune(cfg.finetune, bool(cfg.model.weights) or cfg.model.kwargs.get("pretrained") is True)
    if cfg.finetune.strategy == "two_stage" and cfg.finetune.head_epochs >= t.epochs:
        raise VisrecError(f"finetune.head_epochs={cfg.finetune.head_epochs} leaves no epoch of the {t.epochs} "
                          "to train everything", "train more epochs or fewer head epochs")


class Trainer:
    """Trains one run described by a resolved Config into one run folder."""

    def __init__(
        self,
        cfg: Config,
        *,
        out: str | Path | None = None,
        dataset: Dataset | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool | None = None,
        quiet: bool = False,
        _resume_dir: Path | None = None,
    ):
        _check_config(cfg)
        self.cfg = cfg
        if is_file_model(cfg.model.name):
            # The run must find the file again from any working directory.
            path, fn = cfg.model.name.rsplit(":", 1)
            cfg.model.name = f"{Path(path).expanduser().resolve()}:{fn}"
        self.ds = dataset if dataset is not None else dataset_from_config(cfg)
        if _resume_dir is not None:
            self.run_dir = _resume_dir
        else:
            self.run_dir = Path(out) if out else Path("runs") / default_run_name(cfg.data.name, cfg.model.name)
            if (self.run_dir / "config.yaml").exists():
                raise VisrecError(f"{self.run_dir} already holds a run",
                                  f"continue it with --resume {self.run_dir}, or choose another --out")
        self.extra_callbacks = list(callbacks)
        self.progress = progress
        self.quiet = quiet  # no progress output at all
        self._stop_reason: str | None = None
        self._resume_dir = _resume_dir
        self._setup()
        self.resuming = _resume_dir is not None
        if self.resuming:
            self._restore()

    @classmethod
    def resume(
        cls, run_dir: str | Path, *, callbacks: Sequence[Callback] = (), progress: bool | None = None
    ) -> Trainer:
        """A Trainer that continues the run in `run_dir` from its last checkpoint."""
        run = Run(run_dir)
        if run.status == "completed":
            raise VisrecError(f"{run.path} has already completed training", "start a new run instead")
        return cls(run.config, callbacks=callbacks, progress=progress, _resume_dir=run.path)

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg, ds = self.cfg, self.ds
        set_threads(cfg.train.threads)
        device = resolve_device(cfg.train.device)
        self.runtime = Runtime(device, resolve_precision(cfg.train.precision, device))
        seed_everything(cfg.train.seed)
        self.normalizer = Normalizer.fit(ds.train.images, cfg.data.normalize).to(device)
        self.model = create_model(cfg.model.name, in_chans=ds.channels, num_classes=ds.num_classes,
                                  image_size=ds.image_size, **cfg.model.kwargs)
        self._fit_data_dependent()
        self.initial_weights_note = None
        if cfg.model.weights and self._resume_dir is None:  # a resumed run's checkpoint holds its weights
            self.initial_weights_note, source_norm = load_initial_weights(
                self.model, cfg.model.weights, cfg.model.trust_checkpoint, new_head=cfg.finetune.strategy != "none")
            if source_norm is not None:  # a run's network sees its inputs preprocessed as in its own training
                self.normalizer = Normalizer.from_state(source_norm).to(device)
        self.channels_last = use_channels_last(cfg.model.channels_last, self.model)
        self.model.to(device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.forward = torch.compile(self.model) if cfg.model.compile else self.model
        self.loss_fn = build_loss(cfg.loss)
        self.finetune = None
        if cfg.finetune.strategy != "none":
            from ..transfer import Finetune

            self.finetune = Finetune.build(self.model, cfg.finetune, ds.channels, ds.image_size)
        self.optimizer = build_optimizer(self.model, cfg.optim,
                                         lr_factors=self.finetune.lr_factors() if self.finetune else None)
        self.batches = DeviceBatches(ds.train.images.to(device), ds.train.labels.to(device), cfg.train.batch_size,
                                     seed=cfg.train.seed)
        self.steps_per_epoch = len(self.batches)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.swa: SWA | None = None  # created at its first update
        self.swa_start = round((1 - cfg.train.swa) * self.total_steps) if cfg.train.swa > 0 else None
        self.schedule = LRSchedule(self.optimizer, self._lr_factor())
        self.pipeline = Pipeline(cfg.data.augment, device, seed=cfg.train.seed + 1)
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema > 0 else None
        self.snapshots = set(snapshot_steps(cfg.schedule, self.total_steps, self.steps_per_epoch))
        d = cfg.distill
        self.teachers = (Teachers(d.teachers, ds, self.normalizer, device, d.temperature, d.alpha)
                         if d.teachers else None)
        self.tta = resolve_tta(cfg.eval.tta, cfg.data.augment)
        self.crop_pad = resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment)
        # Position: the next batch to train is batch `batch` of 0-based epoch `epoch`.
        self.epoch, self.batch, self.step = 0, 0, 0
        self.train_seconds = 0.0
        self.best_val_acc, self.best_epoch = -1.0, 0
        self.skipped_steps = 0
        self.started = _now()

    def _fit_data_dependent(self, n: int = 10_000) -> None:
        """Fit the layers set from the data rather than trained (a whitening first layer) on a seeded sample of
        the normalized training images. Loaded weights or a resumed checkpoint replace what this sets."""
        layers = [m for m in self.model.modules() if isinstance(m, PatchWhitening)]  # each must be the first layer
        if not layers:
            return
        images = self.ds.train.images
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.cfg.train.seed))[:n]
        x = self.normalizer(images[idx].to(self.normalizer.mean.device))
        for m in layers:
            m.fit(x.to(m.weight.device))

    def _lr_factor(self):
        """The schedule's factor per step: restarted when a two-stage fine-tune unfreezes the network, and held
        at train.swa_lr during SWA when that is set."""
        cfg, total, spe = self.cfg, self.total_steps, self.steps_per_epoch
        if self.finetune is not None and cfg.finetune.strategy == "two_stage":
            t1 = cfg.finetune.head_epochs * spe
            head, body = schedule_factor(cfg.schedule, t1, spe), schedule_factor(cfg.schedule, total - t1, spe)

            def base(t: int) -> float:
                return head(t) if t < t1 else body(t - t1)
        else:
            base = schedule_factor(cfg.schedule, total, spe)
        if self.swa_start is not None and cfg.train.swa_lr > 0:
            start, hold = self.swa_start, cfg.train.swa_lr
            return lambda t: hold if t >= start else base(t)
        return base

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.run_dir / "checkpoints", "last", with_state=True)
        m = ckpt.meta
        if m["classes"] != self.ds.classes:
            raise VisrecError(f"{self.run_dir}: the dataset's classes changed since the run started",
                              f"run had {m['classes']}, data now has {self.ds.classes}")
        self.model.load_state_dict(ckpt.weights)
        if self.ema is not None and ckpt.ema is not None:
            self.ema.module.load_state_dict(ckpt.ema)
            self.ema.load_state_dict(m["ema"])
        if ckpt.swa is not None:
            self.swa = SWA(self.model)
            self.swa.module.load_state_dict(ckpt.swa)
            self.swa.load_state_dict(m["swa"])
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.schedule.load_state_dict(m["schedule"])
        self.normalizer = Normalizer.from_state(m["preprocess"]).to(self.runtime.device)
        torch.set_rng_state(ckpt.rng["torch_cpu"])
        if "cuda" in ckpt.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.rng["cuda"])
        self.pipeline.set_state({"gen": ckpt.rng["augment"], "rng": m["augment_rng"]})
        self.epoch, self.batch, self.step = m["epoch"], m["batch"], m["step"]
        self.train_seconds = m["train_seconds"]
        self.best_val_acc, self.best_epoch = m["best_val_acc"], m["best_epoch"]
        self.skipped_steps = m.get("skipped_steps", 0)
        self.started = m.get("started", self.started)

    # ------------------------------------------------------------------ run folder

    def _meta(self) -> dict[str, Any]:
        ds = self.ds
        return {
            "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "train_seconds": self.train_seconds, "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch,
            "skipped_steps": self.skipped_steps, "started": self.started, "saved": _now(),
            "classes": ds.classes, "preprocess": self.normalizer.state(),
            "model": {"name": self.cfg.model.name, "kwargs": self.cfg.model.kwargs, "in_chans": ds.channels,
                      "num_classes": ds.num_classes, "image_size": list(ds.image_size)},
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "swa": self.swa.state_dict() if self.swa else None,
            "augment_rng": self.pipeline.get_state()["rng"],
        }

    def _save_last(self) -> None:
        # Never replace the last good checkpoint with poisoned weights: a NaN can arrive between two logged
        # windows (whose losses are checked) and a checkpoint_every save. One host sync per save.
        # With train.nonfinite=skip the user accepts skipped steps, whose forward passes may still have pushed
        # batch-norm statistics to inf: then only the parameters must be finite.
        skip = self.cfg.train.nonfinite == "skip"
        state = list(self.model.parameters()) if skip else [
            t for t in self.model.state_dict().values() if t.is_floating_point()]  # weights and BN statistics
        if not bool(torch.stack([torch.isfinite(t).all() for t in state]).all()):
            raise self._nonfinite(self.step)
        rng = {"torch_cpu": torch.get_rng_state(), "augment": self.pipeline.gen.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(self.run_dir / "checkpoints", "last", self.model, self._meta(),
                        ema=self.ema.module if self.ema else None, swa=self.swa.module if self.swa else None,
                        optimizer=self.optimizer, rng=rng)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(self.run_dir / "config.yaml", self.cfg.to_dict())
        write_json(self.run_dir / "splits.json", {"dataset": self.ds.name, "source": self.ds.source,
                                                  "classes": self.ds.classes, **self.ds.splits})
        write_text(self.run_dir / "model.txt", f"{self.model}\n\nparameters: {self.params:,}\n")
        skipped = self.ds.splits.get("skipped_images")
        if skipped:
            write_text(self.run_dir / "skipped_images.txt",
                       "".join(f"{f['path']}\t{f['problem']}\n" for f in skipped["files"]))

    # ------------------------------------------------------------------ the loop

    def _state(self, epoch: int | None = None) -> TrainState:
        """`epoch` (1-based) defaults to the epoch in progress."""
        epoch = epoch if epoch is not None else min(self.epoch + 1, self.cfg.train.epochs)
        return TrainState(self.run_dir, epoch, self.cfg.train.epochs, self.step, self.total_steps,
                          self.steps_per_epoch, self.train_seconds, self.model, self.optimizer)

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            self._stop_reason = signal.Signals(signum).name
            signal.signal(signal.SIGINT, signal.default_int_handler)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _averages(self) -> dict[str, torch.nn.Module]:
        """The weights to compare: raw, and the EMA and SWA averages when on (SWA once it is final)."""
        out = {"raw": self.model}
        if self.ema is not None:
            out["ema"] = self.ema.module
        if self.swa is not None and self.epoch + 1 >= self.cfg.train.epochs:
            out["swa"] = self.swa.module
        return out

    def _eval_model(self) -> torch.nn.Module:
        """The weights the run is judged by: SWA over EMA over raw."""
        return list(self._averages().values())[-1]

    def _evaluate(self, model: torch.nn.Module, split: str) -> EvalResult:
        return evaluate(model, self.ds.split(split), self.normalizer, split=split, batch_size=self.cfg.eval.batch_size,
                        channels_last=self.channels_last, amp_dtype=self.runtime.amp_dtype, tta=self.tta,
                        crop_pad=self.crop_pad)

    def _nonfinite(self, step: int) -> NonFiniteLoss:
        cfg = self.cfg
        lr = cfg.optim.lr * self.schedule.factor(step - 1)
        causes = [f"the learning rate is too high (lr was {lr:.3g} at that step): try --lr {cfg.optim.lr / 10:.3g}"]
        if cfg.data.normalize == "none":
            causes.append("inputs are raw 0..255 values: use --set data.normalize=channel")
        if cfg.optim.grad_clip == 0:
            causes.append("gradients exploded: try --set optim.grad_clip=1.0")
        causes.append("the model outputs probabilities instead of logits (a softmax before the loss), or a custom "
                      "layer divides by zero or takes log of 0")
        return NonFiniteLoss(
            f"the loss became non-finite (NaN or inf) at step {step} (epoch {self.epoch + 1}); training stopped. "
            f"The last good checkpoint is in {self.run_dir / 'checkpoints'}.",
            "likely causes:\n    - " + "\n    - ".join(causes),
        )

    def stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step, as Ctrl-C does (an observer may call this)."""
        self._stop_reason = reason

    def fit(self, *, stop_after_steps: int | None = None, test: bool = True) -> Run:
        """Train to the end (or until stopped), evaluate on test, and return the Run.

        `stop_after_steps` stops after that many optimizer steps in total, exactly as a Ctrl-C would:
        a resumable checkpoint is saved and the run's status is `interrupted`. `test=False` leaves the test
        split untouched (hyperparameter search judges by validation accuracy only).
        """
        self._write_run_files()
        tb = TensorBoardLogger(self.run_dir / "tb", purge_step=self.step if self.resuming else None,
                               config=self.cfg.to_dict(), histograms=self.cfg.train.histograms,
                               activations=not self.cfg.model.compile)
        callbacks: list[Callback] = [
            MetricsLogger(self.run_dir / "metrics.jsonl", resume_step=self.step if self.resuming else None),
            tb,
            *([] if self.quiet else [ProgressPrinter(live=self.progress)]),
            *self.extra_callbacks,
        ]
        for cb in callbacks:
            cb.on_train_start(self._state())
        try:
            with self._stop_signals():
                finished = self._loop(callbacks, stop_after_steps)
        except BaseException as e:  # record why the run ended, close the loggers, then let it propagate
            why = e.message if isinstance(e, VisrecError) else f"{type(e).__name__}: {e}"
            summary = self._write_summary("failed", None, error=why)
            for cb in callbacks:
                cb.on_train_end(self._state(), summary)
            raise
        if not finished:
            summary = self._write_summary("interrupted", None, error=f"stopped by {self._stop_reason}")
            for cb in callbacks:
                cb.on_train_end(self._state(), summary)
            return Run(self.run_dir)
        if self.cfg.train.select == "best" and self.best_epoch > 0:
            best = load_checkpoint(self.run_dir / "checkpoints", "best")
            self.model.load_state_dict(best.weights)
            if self.ema is not None and best.ema is not None:
                self.ema.module.load_state_dict(best.ema)
        result = self._evaluate(self._eval_model(), "test") if test else None
        if result is not None:
            result.save(self.run_dir)
        compared = {}
        if len(self._averages()) > 1:  # how much averaging gained over the raw weights, on val and test
            for name, m in self._averages().items():
                compared[name] = {"val_acc": self._evaluate(m, "val").acc if self.ds.val is not None else None}
                if result is not None:
                    compared[name]["test_acc"] = (result.acc if m is self._eval_model() else
                                                  self._evaluate(m, "test").acc)
        summary = self._write_summary("completed", result, compared=compared)
        for cb in callbacks:  # TensorBoard last: the report (which shows the doctor's findings) adds figures to it
            if cb is not tb:
                cb.on_train_end(self._state(), summary)
        if test and self.cfg.train.report:
            self._write_report(tb)
        tb.on_train_end(self._state(), summary)
        return Run(self.run_dir)

    def _write_report(self, tb: TensorBoardLogger) -> None:
        """report.html, its figures also to TensorBoard; a report that cannot be drawn never fails the run."""
        from ..report import build_report

        try:
            rep = build_report(Run(self.run_dir))
        except Exception as e:  # noqa: BLE001 - the trained model and its results are already safe on disk
            print(f"visrec: report.html was not written: {type(e).__name__}: {e} "
                  f"(retry with `visrec report {self.run_dir}`)", file=sys.stderr)
            return
        tb.add_figures({k: v for k, v in rep.figures.items() if k in ("filters", "gradcam", "saliency", "confusion")},
                       self.step)

    def _loop(self, callbacks: list[Callback], stop_after_steps: int | None) -> bool:
        cfg, model, opt = self.cfg, self.forward, self.optimizer
        device, amp = self.runtime.device, self.runtime.amp_dtype
        log_every, clip, skip_bad = cfg.train.log_every, cfg.optim.grad_clip, cfg.train.nonfinite == "skip"
        params = list(self.model.parameters())  # frozen ones have no gradient and are skipped
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        bs = self.batches.batch_size

        if self.finetune is not None and cfg.finetune.strategy == "linear":
            return self._loop_linear(callbacks, stop_after_steps)
        swa_every = cfg.train.swa_every if self.swa_start is not None else 0
        while self.epoch < cfg.train.epochs:
            if self.finetune is not None:
                self.finetune.apply(self.model, self.epoch)
            ep_loss = torch.zeros((), device=device)
            ep_correct = torch.zeros((), device=device, dtype=torch.long)
            ep_steps = 0
            win_losses: list[torch.Tensor] = []
            win_correct = torch.zeros((), device=device, dtype=torch.long)
            win_start = self.step
            t_epoch = t_win = time.perf_counter()
            seconds_before = self.train_seconds
            for xb, yb in self.batches.epoch(self.epoch, start=self.batch):
                # ---- hot path: no host syncs here ----
                x = self.normalizer(xb).contiguous(memory_format=memory_format)
                x, target = self.pipeline(x, yb) if self.pipeline else (x, yb)
                with autocast(device, amp):
                    logits = model(x)
                loss = self.loss_fn(logits, target)
                aux = getattr(self.model, "aux_outputs", None)  # auxiliary heads (GoogLeNet), training only
                if aux:
                    loss = loss + self.model.aux_weight * sum(self.loss_fn(a, target) for a in aux)
                if self.teachers is not None:
                    with autocast(device, amp):
                        soft = self.teachers.loss(logits, x)
                    loss = (1 - self.teachers.alpha) * loss + self.teachers.alpha * soft
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                if skip_bad and not torch.isfinite(loss):  # host sync, only when asked for
                    self.skipped_steps += 1
                else:
                    opt.step()
                    if self.ema is not None:
                        self.ema.update(self.model)
                self.schedule.step()
                self.step += 1
                self.batch += 1
                if swa_every and self.step >= self.swa_start and (self.step - self.swa_start) % swa_every == 0:
                    self._swa_update()
                if self.step in self.snapshots:
                    t0 = time.perf_counter()
                    self._save_snapshot()
                    t_epoch += time.perf_counter() - t0  # saving is not training time
                labels = target.a if isinstance(target, MixedTargets) else target
                correct = (logits.detach().argmax(1) == labels).sum()
                win_losses.append(loss.detach())
                win_correct += correct
                ep_correct += correct
                ep_steps += 1
                # ---- end of hot path ----
                last_in_epoch = self.batch == self.steps_per_epoch
                stop = self._stop_reason is not None or (stop_after_steps is not None and self.step >= stop_after_steps)
                if self.step % log_every == 0 or last_in_epoch or stop:
                    losses = torch.stack(win_losses).float()
                    finite = torch.isfinite(losses)
                    if not skip_bad and not bool(finite.all()):  # host sync, once per window
                        bad_step = win_start + int((~finite).nonzero()[0]) + 1
                        raise self._nonfinite(bad_step)
                    sync(device)
                    now = time.perf_counter()
                    self.train_seconds = seconds_before + (now - t_epoch)
                    n_img = len(win_losses) * bs
                    ep_loss += losses[finite].sum()
                    rec = {"epoch": self.epoch + 1, "step": self.step, "split": "train", "kind": "window",
                           "loss": losses[finite].mean().item() if bool(finite.any()) else float("nan"),
                           "acc": win_correct.item() / n_img, "lr": self.schedule.lr,
                           "seconds": round(self.train_seconds, 3), "images_per_s": n_img / max(now - t_win, 1e-9)}
                    for cb in callbacks:
                        cb.on_window(self._state(), rec)
                    win_losses, win_start, t_win = [], self.step, time.perf_counter()
                    win_correct = torch.zeros((), device=device, dtype=torch.long)
                    stop = stop or self._stop_reason is not None  # a signal that came while logging
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 and not last_in_epoch:
                    t0 = time.perf_counter()
                    self._save_last()
                    t_epoch += time.perf_counter() - t0  # saving is not training time
                if stop:
                    self._stop_reason = self._stop_reason or f"stop_after_steps={stop_after_steps}"
                    self._save_last()
                    return False
            sync(device)
            if ep_steps:
                self.train_seconds = seconds_before + (time.perf_counter() - t_epoch)
            self._end_epoch(callbacks, ep_loss, ep_correct, ep_steps, bs, self.train_seconds - seconds_before)
        return True

    def _swa_update(self) -> None:
        if self.swa is None:
            self.swa = SWA(self.model)
        self.swa.update(self.model)

    def _save_snapshot(self) -> None:
        """The weights at the end of a learning-rate cycle, as checkpoint `snapshotK` (snapshot ensembles)."""
        k = sorted(self.snapshots).index(self.step) + 1
        save_checkpoint(self.run_dir / "checkpoints", f"snapshot{k}", self.model, self._meta())

    def _loop_linear(self, callbacks: list[Callback], stop_after_steps: int | None) -> bool:
        """Linear classifier on cached features: the frozen network's features are extracted once (or read from
        the cache), then only the head trains, on feature batches, with the run's optimizer and schedule."""
        from ..transfer import cache_dir, cached_features

        cfg, device, head = self.cfg, self.runtime.device, self.model.get_classifier()
        self.finetune.apply(self.model, self.epoch)
        t0 = time.perf_counter()
        feats, hit = cached_features(self.model, self.ds.train.images, self.normalizer, cache_dir(cfg.finetune),
                                     self.channels_last)
        self.feature_cache_hit, self.feature_seconds = hit, time.perf_counter() - t0
        batches = DeviceBatches(feats.to(device), self.ds.train.labels.to(device), cfg.train.batch_size,
                                seed=cfg.train.seed)
        while self.epoch < cfg.train.epochs:
            ep_loss = torch.zeros((), device=device)
            ep_correct = torch.zeros((), device=device, dtype=torch.long)
            ep_steps, t_epoch, seconds_before = 0, time.perf_counter(), self.train_seconds
            for fb, yb in batches.epoch(self.epoch, start=self.batch):
                logits = head(fb)
                loss = self.loss_fn(logits, yb)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.schedule.step()
                self.step += 1
                self.batch += 1
                ep_loss += loss.detach()
                ep_correct += (logits.detach().argmax(1) == yb).sum()
                ep_steps += 1
                if self._stop_reason is not None or (stop_after_steps is not None and self.step >= stop_after_steps):
                    self._stop_reason = self._stop_reason or f"stop_after_steps={stop_after_steps}"
                    self.train_seconds = seconds_before + (time.perf_counter() - t_epoch)
                    self._save_last()
                    return False
            if not bool(torch.isfinite(ep_loss)):
                raise self._nonfinite(self.step)
            self.train_seconds = seconds_before + (time.perf_counter() - t_epoch)
            self._end_epoch(callbacks, ep_loss, ep_correct, ep_steps, batches.batch_size,
                            self.train_seconds - seconds_before)
            self.finetune.apply(self.model, self.epoch)  # evaluation put the whole model back in train mode
        return True

    def _end_epoch(self, callbacks, ep_loss, ep_correct, ep_steps: int, bs: int, ep_seconds: float) -> None:
        records = []
        if ep_steps:
            n = ep_steps * bs
            records.append({"epoch": self.epoch + 1, "step": self.step, "split": "train", "kind": "epoch",
                            "loss": ep_loss.item() / ep_steps, "acc": ep_correct.item() / n,
                            "lr": self.schedule.lr, "seconds": round(self.train_seconds, 3),
                            "images_per_s": n / max(ep_seconds, 1e-9)})
        if self.swa_start is not None and not self.cfg.train.swa_every and self.step >= self.swa_start:
            self._swa_update()
        if self.swa is not None and self.epoch + 1 == self.cfg.train.epochs:  # the average is final: fit its BN
            recompute_batchnorm(self.swa.module, self.ds.train.images, self.normalizer,
                                batch_size=self.cfg.eval.batch_size)
        if self.ds.val is not None:
            r = self._evaluate(self._eval_model(), "val")
            records.append({"epoch": self.epoch + 1, "step": self.step, "split": "val", "kind": "epoch",
                            "loss": r.loss, "acc": r.acc, "top5": r.top5, "lr": self.schedule.lr,
                            "seconds": round(self.train_seconds, 3)})
            if r.acc > self.best_val_acc:
                self.best_val_acc, self.best_epoch = r.acc, self.epoch + 1
                save_checkpoint(self.run_dir / "checkpoints", "best", self.model, self._meta(),
                                ema=self.ema.module if self.ema else None)
        self.epoch += 1
        self.batch = 0
        self._save_last()
        state = self._state(epoch=self.epoch)
        for cb in callbacks:
            cb.on_epoch_end(state, records)

    def _write_summary(self, status: str, test: EvalResult | None, error: str | None = None,
                       compared: dict[str, dict[str, float | None]] | None = None) -> dict[str, Any]:
        cfg, ds = self.cfg, self.ds
        metrics = Run(self.run_dir).metrics() if (self.run_dir / "metrics.jsonl").exists() else []
        vals = [r for r in metrics if r["split"] == "val"]
        epoch_train = [r for r in metrics if r["split"] == "train" and r["kind"] == "epoch"]
        summary: dict[str, Any] = {
            "status": status,
            "dataset": ds.name,
            "model": cfg.model.name,
            "params": self.params,
            "num_classes": ds.num_classes,
            "epochs": self.epoch,
            "epochs_planned": cfg.train.epochs,
            "steps": self.step,
            "train_seconds": round(self.train_seconds, 3),
            "images_per_s": round(self.step * self.batches.batch_size / self.train_seconds, 1)
            if self.train_seconds > 0 else None,
            "test_acc": test.acc if test else None,
            "test_top5": test.top5 if test else None,
            "test_loss": test.loss if test else None,
            "val_acc": vals[-1]["acc"] if vals else None,
            "best_val_acc": self.best_val_acc if self.best_val_acc >= 0 else None,
            "best_epoch": self.best_epoch or None,
            "train_acc": epoch_train[-1]["acc"] if epoch_train else None,
            "eval_weights": cfg.train.select + ("+swa" if self.swa else "+ema" if self.ema else ""),
            "tta": self.tta,
            "skipped_steps": self.skipped_steps,
            "n_train": len(ds.train), "n_val": len(ds.val) if ds.val is not None else 0, "n_test": len(ds.test),
            "device": str(self.runtime.device),
            "precision": str(self.runtime.amp_dtype).replace("torch.", "") if self.runtime.amp_dtype else "fp32",
            "channels_last": self.channels_last,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "visrec": __version__,
            "python": platform.python_version(),
            "started": self.started,
            "finished": _now(),
        }
        if compared:
            summary["weights_compared"] = compared
        if self.snapshots:
            summary["snapshots"] = [f"snapshot{k + 1}" for k in range(len(self.snapshots))]
        if self.finetune is not None:
            summary["finetune"] = {"strategy": cfg.finetune.strategy, "plan": self.finetune.describe(),
                                   "source": cfg.model.weights or cfg.model.name}
            if hasattr(self, "feature_cache_hit"):
                summary["finetune"].update(feature_cache_hit=self.feature_cache_hit,
                                           feature_seconds=round(self.feature_seconds, 3))
        if self.teachers is not None:
            summary["distill"] = {"teachers": cfg.distill.teachers, "temperature": cfg.distill.temperature,
                                  "alpha": cfg.distill.alpha}
        if test is not None:
            summary["test"] = test.to_dict()
            summary["most_confused"] = [list(t) for t in test.most_confused(5)]
        if error:
            summary["error"] = error
        write_json(self.run_dir / "summary.json", summary)
        return summary


def train(
    data: str | Dataset | None = None,
    *,
    model: str | None = None,
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
                                train_epochs=epochs, train_batch_size=batch_size, optim_lr=lr, train_seed=seed)
    return Trainer(cfg, out=out, dataset=dataset, callbacks=callbacks, progress=progress).fit()


def load_initial_weights(model: nn.Module, path: str, trust: bool, *, new_head: bool = False
                         ) -> tuple[str, dict[str, Any] | None]:
    """Load a weight file, or the weights of a run folder (`RUN`, `RUN:best`, `RUN:last`), into a fresh model by
    name. A classifier head whose shape differs (another number of classes), or any head with `new_head`, keeps its
    fresh initialization; any other missing, unexpected or mis-shaped tensor is an error.

    Returns a note for the user and, for a run, its preprocessing state (the network expects inputs prepared so)."""
    from ..ensemble import parse_member, split_member
    from ..io import load_weights

    norm = None
    if split_member(path)[0].is_dir():
        run, which = parse_member(path)
        ckpt = load_checkpoint(run.path / "checkpoints", run.checkpoint_tag(which))
        weights = dict(ckpt.swa or ckpt.ema or ckpt.weights)
        norm = ckpt.meta["preprocess"]
    else:
        weights = load_weights(path, trust=trust)
    own = model.state_dict()
    head = model.head_path + "." if hasattr(model, "head_path") else None
    skipped = [k for k, v in weights.items() if k in own and head and k.startswith(head)
               and (new_head or own[k].shape != v.shape)]
    for k in skipped:
        del weights[k]
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                 if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights and k not in skipped]
    unexpected = [k for k in weights if k not in own]
    if bad_shape or missing or unexpected:
        parts = [f"{name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("shape differs", bad_shape), ("missing", missing), ("unexpected", unexpected))
                 if keys]
        hint = "use a file saved from the same architecture (see visrec summary MODEL)"
        first = next(iter(own))
        if first in weights and own[first].dim() == 4 and own[first].shape != weights[first].shape:
            want, have = tuple(weights[first].shape), tuple(own[first].shape)
            if want[1] != have[1]:
                hint = f"the weights take {want[1]}-channel images: add --set data.channels={want[1]}"
            elif want[2:] != have[2:]:
                hint = ("the weights have another stem (first layer): for small images visrec uses a 3x3 stem; "
                        "add --set model.kwargs.stem=imagenet")
        raise VisrecError(f"weight file {path} does not fit model {type(model).__name__}: {'; '.join(parts)}", hint)
    model.load_state_dict(weights, strict=False)
    note = f"loaded {path}" + (f"; classifier head {', '.join(skipped)} re-initialized for this dataset's classes"
                               if skipped else "")
    return note, norm


def resume(run_dir: str | Path, *, callbacks: Sequence[Callback] = (), progress: bool | None = None) -> Run:
    """Continue a stopped run from its last checkpoint."""
    return Trainer.resume(run_dir, callbacks=callbacks, progress=progress).fit()

