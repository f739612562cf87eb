"""Observers of training: they receive events with read-only records and never steer the loop.

Events: `on_train_start(state)`, `on_window(state, record)` every `log.every` steps,
`on_epoch_end(state, records)` after validation, `on_train_end(state, summary)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

HISTOGRAM_BINS = 64


def histogram_stats(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """A histogram of the finite values, computed on their device without a host sync: one tensor of
    (min, max, count, sum, sum of squares, `bins` counts over [min, max]) to read when convenient."""
    v = values.detach().flatten().float()
    finite = torch.isfinite(v)
    weight = finite.float()
    vz = torch.where(finite, v, torch.zeros((), device=v.device))
    lo = torch.where(finite, v, torch.full((), math.inf, device=v.device)).amin()
    hi = torch.where(finite, v, torch.full((), -math.inf, device=v.device)).amax()
    width = (hi - lo).clamp_min(1e-12)
    idx = torch.nan_to_num((vz - lo) / width * bins, nan=0.0, posinf=bins - 1, neginf=0.0).long().clamp(0, bins - 1)
    counts = torch.zeros(bins, device=v.device).scatter_add_(0, idx, weight)
    return torch.cat([torch.stack([lo, hi, weight.sum(), vz.sum(), (vz * vz).sum()]), counts])


@dataclass(frozen=True)
class TrainState:
    """What observers may look at. `model` is shared: read it, never modify it."""

    run_dir: Path
    epoch: int  # 1-based epoch in progress (or just finished)
    epochs: int
    step: int  # optimizer steps done
    total_steps: int
    steps_per_epoch: int
    train_seconds: float
    model: Any = None
    optimizer: Any = None  # read-only too: monitors may register hooks that only observe
    request_stop: Callable[[str], None] | None = None  # ask the loop to stop after this step, as Ctrl-C does
    primary: str = "acc"  # the task's primary metric: the field records and summaries lead with


class Callback:
    def on_train_start(self, state: TrainState) -> None: ...

    def on_window(self, state: TrainState, record: dict[str, Any]) -> None: ...

    def on_epoch_end(self, state: TrainState, records: list[dict[str, Any]]) -> None: ...

    def on_train_end(self, state: TrainState, summary: dict[str, Any]) -> None: ...


def flat_hparams(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as TensorBoard hyperparameters: dotted keys, values bool/int/float/str (lists as text)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        elif v is None:
            out[key] = ""
        else:
            out[key] = json.dumps(v)
    return out


class TensorBoardLogger(Callback):
    """TensorBoard events under tb/ in the run folder: scalars (loss/*, acc/*, lr, throughput), weight and
    activation histograms every `histograms` epochs (0 = none; activations sampled at the first training batch
    after each such epoch, at most 65,536 values per stage), figures (`log_figures`), and the run's
    hyperparameters with its final metrics (the HParams tab compares runs side by side)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None, *, config: dict[str, Any] | None = None,
                 histograms: int = 0, activations: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.config, self.histograms, self.activations = config, histograms, activations
        self._hooks: dict[str, Any] = {}  # stage path -> forward hook waiting for its next forward pass
        self._pending: list[tuple[str, int, Any]] = []  # (tag, step, histogram_stats) not yet written
        self._step = 0

    def on_train_start(self, state):
        self._step = state.step
        if not self.histograms or state.model is None:
            return
        self._weights(state.model, state.step)
        self._arm(state.model)

    def _arm(self, model: Any) -> None:
        """Hook every stage until its next forward pass: each hook records one histogram, then removes itself, so
        the steps in between run without hooks."""
        if not self.activations:
            return
        for path in getattr(model, "stage_paths", ()):
            if path not in self._hooks:
                self._hooks[path] = model.get_submodule(path).register_forward_hook(
                    lambda m, i, o, path=path: self._activation(path, o))

    def _activation(self, path: str, output: Any) -> None:
        self._hooks.pop(path).remove()
        if not hasattr(output, "detach") or not output.numel():
            return
        flat = output.detach().flatten()
        stride = max(1, flat.numel() // 65536)  # a strided sample: no random numbers are drawn
        # Binned where the values are, read at the epoch's end: no host sync in the training step.
        self._pending.append((f"activations/{path}", self._step, histogram_stats(flat[::stride])))

    def _flush_histograms(self) -> None:
        if not self._pending:
            return
        rows = torch.stack([s for _, _, s in self._pending]).cpu().tolist()  # one transfer for all
        for (tag, step, _), row in zip(self._pending, rows, strict=True):
            lo, hi, n, total, squares, *counts = row
            if n <= 0:  # nothing finite to show (a diverged run)
                continue
            width = (hi - lo) / len(counts)
            limits = [lo + width * (i + 1) for i in range(len(counts))]
            with contextlib.suppress(ValueError):
                self.writer.add_histogram_raw(tag, lo, hi, n, total, squares, limits, counts, step)
        self._pending = []

    def _weights(self, model: Any, step: int) -> None:
        for name, p in model.named_parameters():
            if p.numel():
                self._pending.append((f"weights/{name}", step, histogram_stats(p)))
        self._flush_histograms()

    def _metrics(self, record: dict[str, Any], suffix: str) -> None:
        """Every metric of a record (loss, acc, top5, a task's own) as `metric/split` scalars."""
        for k, v in record.items():
            if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool):
                self.writer.add_scalar(f"{k}/{suffix}", v, record["step"])

    def on_window(self, state, record):
        self._step = record["step"]
        self._metrics(record, "train")
        self.writer.add_scalar("lr", record["lr"], record["step"])
        self.writer.add_scalar("images_per_s", record["images_per_s"], record["step"])
        if "data_share" in record:  # of the window's time, waiting for data (the rest: the step)
            self.writer.add_scalar("time/data_share", record["data_share"], record["step"])
            self.writer.add_scalar("time/data_seconds", record["data_seconds"], record["step"])

    def on_epoch_end(self, state, records):
        for r in records:
            self._metrics(r, "val" if r["split"] == "val" else "train_epoch")
        self._flush_histograms()
        self._step = state.step
        if self.histograms and state.model is not None and state.epoch % self.histograms == 0:
            self._weights(state.model, state.step)
            if state.epoch < state.epochs:  # after the last epoch, the next forward passes are test evaluation
                self._arm(state.model)
        self.writer.flush()

    def on_train_end(self, state, summary):
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}
        self._flush_histograms()
        p = state.primary
        if summary.get("test"):
            self.writer.add_scalar(f"{p}/test", summary["test"][p], state.step)
        if self.config is not None and summary.get("status") == "completed":
            from torch.utils.tensorboard.summary import hparams

            metrics = {f"hparam/{k}": float(summary[k]) for k in
                       (f"test_{p}", "test_loss", f"best_val_{p}", f"val_{p}", f"train_{p}", "train_seconds")
                       if isinstance(summary.get(k), (int, float))}
            exp, ssi, sei = hparams(flat_hparams(self.config), metrics)
            fw = self.writer._get_file_writer()
            for item in (exp, ssi, sei):
                fw.add_summary(item)
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, state.step)
        self.writer.close()


def log_figures(writer: Any, figures: dict[str, bytes], step: int) -> None:
    """PNG figures (filters, Grad-CAM examples, confusion matrix) as TensorBoard images under figures/."""
    import io

    import numpy as np
    from PIL import Image

    for name, png in figures.items():
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        writer.add_image(f"figures/{name}", img, step, dataformats="HWC")


_NOT_METRICS = {"epoch", "step", "lr", "seconds", "images_per_s", "data_seconds", "data_share"}


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


PERCENT_METRICS = ("acc", "top5", "loc_acc", "pix_acc")  # shares of images, written as percentages


def format_metric(name: str, value: Any, missing: str = "-") -> str:
    """`93.10%` for accuracies, `0.0123` for any other metric, `missing` for none or a non-finite value."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return missing
    return f"{value:.2%}" if name in PERCENT_METRICS else f"{value:.4g}"


def _metric(record: dict[str, Any], name: str) -> str:
    """`name value` of a record; a training record without the primary metric (segmentation tracks pixel
    accuracy per batch, not mIoU) shows the first metric it has."""
    if name not in record:
        name = next((k for k, v in record.items() if k not in _NOT_METRICS and k != "loss"
                     and isinstance(v, int | float) and not isinstance(v, bool)), "")
        if not name:  # a detector's training records hold its loss alone
            return ""
    return f"{name} {format_metric(name, record.get(name))}"


class ProgressPrinter(Callback):
    """A Rich progress bar on a terminal; plain lines (one per epoch) when output is not a TTY."""

    def __init__(self, console: Console | None = None, live: bool | None = None):
        self.console = console or Console(file=sys.stderr)
        self.live = self.console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.task = None
        self._t0 = time.perf_counter()

    def on_train_start(self, state):
        self._t0 = time.perf_counter()
        if self.live:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("loss {task.fields[loss]}  {task.fields[acc]}  {task.fields[ips]} img/s"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.total_steps, completed=state.step,
                                               epoch=f"{state.epoch}/{state.epochs}", loss="-", acc="-", ips="-")

    def on_window(self, state, record):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.step, epoch=f"{state.epoch}/{state.epochs}",
                                 loss=f"{record['loss']:.3f}", acc=_metric(record, state.primary),
                                 ips=f"{record['images_per_s']:.0f}")

    def on_epoch_end(self, state, records):
        by = {r["split"]: r for r in records}
        tr, va = by.get("train"), by.get("val")
        parts = [f"epoch {state.epoch}/{state.epochs}"]
        if tr:
            extra = "" if state.primary == "loss" else f" {_metric(tr, state.primary)}"
            parts.append(f"train loss {tr['loss']:.4f}{extra}")
        if va:
            bits = [f"loss {va['loss']:.4f}"] if "loss" in va else []  # a detector has no validation loss
            if state.primary != "loss":
                bits.append(_metric(va, state.primary))
            parts.append("val " + " ".join(b for b in bits if b))
        if tr:
            parts.append(f"lr {tr['lr']:.3g}  {tr.get('images_per_s', 0):.0f} img/s")
            if tr.get("data_share", 0) >= 0.05:  # the step waited on data: say how much of the time
                parts.append(f"data wait {tr['data_share']:.0%}")
        done = state.step / max(state.total_steps, 1)
        eta = state.train_seconds * (1 - done) / done if done > 0 else float("nan")
        parts.append(f"train {_fmt_time(state.train_seconds)} (eta {_fmt_time(eta)})")
        line = "  ".join(parts)
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            self.console.print(line, highlight=False, soft_wrap=True)

    def on_train_end(self, state, summary):
        if self.progress is not None:
            self.progress.stop()
