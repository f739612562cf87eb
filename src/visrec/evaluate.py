"""Evaluation: accuracy, top-5, per-class accuracy, confusion matrix, and test-time augmentation (TTA).

TTA averages the softmax probabilities of several views of each image:

    none         the image                                                        1 forward pass
    flip         the image and its mirror                                         2
    crops        the course's multi-crop: center and the four corners of the      5
                 image padded by `eval.crop_pad` pixels (zero after
                 normalization, as the `crop` augmentation pads), i.e. shifts
                 by that much; by default the training crop's pad, else 2
    crops+flip   those five and their mirrors                                     10
    scales       the image resized by 0.9, 1.0 and 1.1, then center-cropped or    3
                 zero-padded back to the model's input size
    scales+flip  those three and their mirrors                                    6
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.augment import AltFlip, HFlip, parse_augmentation
from .data.imageset import ImageSet
from .data.preprocess import Normalizer
from .device import autocast
from .distributed import Dist
from .errors import VisrecError
from .io import write_bytes, write_text
from .plotting import figure_png, pyplot

TTA_MODES = ("none", "flip", "crops", "crops+flip", "scales", "scales+flip")
TTA_SCALES = (0.9, 1.0, 1.1)
CPU_EVAL_VALUES = 98_304  # input values per evaluation batch on a CPU (eval.batch_size=0)


def eval_batch_size(batch_size: int | None, device: torch.device | str, image_shape: Sequence[int],
                    backend: str = "torch") -> int:
    """`eval.batch_size` when it is set (> 0); for 0 (the default) the automatic one: 1024 on an accelerator or
    through onnxruntime (its kernels run as fast at any batch, so fewer calls cost less), and for PyTorch on a CPU
    the largest power of two that keeps a batch within 98,304 input values (64 images of 1x28x28, 32 of 3x32x32),
    at least 16 and at most 1024: a batch whose activations stay in the caches evaluates 2.4-3.6x faster than one
    of 1024 images (bench/eval_batch.txt)."""
    if batch_size:
        return int(batch_size)
    if backend != "torch" or torch.device(device).type != "cpu":
        return 1024
    fits = max(1, CPU_EVAL_VALUES // max(1, math.prod(image_shape)))
    return min(1024, max(16, 1 << (fits.bit_length() - 1)))


def resolve_tta(setting: str, augment: list[str]) -> str:
    """`auto` is flip when training mirrored images (hflip or altflip in data.augment), else none: averaging
    with the mirror helps a model trained flip-invariant and hurts one that was not."""
    if setting == "auto":
        return "flip" if any(isinstance(parse_augmentation(spec), (HFlip, AltFlip)) for spec in augment) else "none"
    if setting not in TTA_MODES:
        raise VisrecError(f"eval.tta {setting!r} is not valid", f"use auto or one of {', '.join(TTA_MODES)}")
    return setting


def resolve_crop_pad(setting: int, augment: list[str]) -> int:
    """The shift of the `crops` views: `eval.crop_pad`, else the pad of a crop/translate augmentation, else 2."""
    if setting < 0:
        raise VisrecError(f"eval.crop_pad={setting} must be >= 0 (0 = from the training augmentation)")
    if setting:
        return setting
    for spec in augment:
        name, _, arg = spec.partition(":")
        if name in ("crop", "translate"):
            return max(1, int(float(arg))) if arg else 2
    return 2


def _fit_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Center-crop or zero-pad (N, C, H', W') to (h, w)."""
    top, left = max(x.shape[2] - h, 0) // 2, max(x.shape[3] - w, 0) // 2
    x = x[:, :, top: top + h, left: left + w]
    dh, dw = h - x.shape[2], w - x.shape[3]
    if dh > 0 or dw > 0:
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
    return x


def tta_views(tta: str, x: torch.Tensor, crop_pad: int = 2) -> list[torch.Tensor]:
    """The views of a preprocessed batch that `tta` averages over (see the module docstring)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta {tta!r} is not one of {TTA_MODES}")
    base = tta.removesuffix("+flip").removesuffix("flip") or "none"
    h, w = x.shape[2:]
    if base == "crops":
        p = crop_pad
        padded = F.pad(x, (p, p, p, p))
        views = [padded[:, :, dy: dy + h, dx: dx + w] for dy, dx in ((p, p), (0, 0), (0, 2 * p), (2 * p, 0),
                                                                     (2 * p, 2 * p))]
    elif base == "scales":
        views = [x if s == 1 else _fit_to(F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear",
                                                        antialias=True, align_corners=False), h, w)
                 for s in TTA_SCALES]
    else:
        views = [x]
    if tta.endswith("flip"):
        views += [v.flip(3) for v in views]
    return views


@dataclass
class EvalResult:
    split: str
    n: int
    loss: float  # mean softmax cross-entropy, no smoothing
    acc: float
    top5: float
    per_class_acc: list[float]
    confusion: torch.Tensor  # (C, C) int64, rows = true class, columns = predicted
    classes: list[str]
    tta: str = "none"
    backend: str = "torch"  # what ran the network (torch, or onnx: onnxruntime)
    # per image, in the split's order (CPU): true and predicted class, and the predicted class's probability
    labels: torch.Tensor | None = field(default=None, repr=False, compare=False)
    pred: torch.Tensor | None = field(default=None, repr=False, compare=False)
    confidence: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_predictions(cls, pred: torch.Tensor, labels: torch.Tensor, classes: list[str], *, split: str = "test",
                         loss: float = float("nan"), top5: float = float("nan"), tta: str = "none",
                         confidence: torch.Tensor | None = None) -> EvalResult:
        """Accuracy, per-class accuracy and confusion matrix of predicted labels against true ones (`confidence`:
        each prediction's probability, if the model gives one)."""
        c, n = len(classes), len(labels)
        conf = torch.bincount(labels * c + pred, minlength=c * c).view(c, c).cpu()
        per_class = (conf.diag().float() / conf.sum(1).clamp_min(1).float()).tolist()
        acc = (pred == labels).float().mean().item() if n else 0.0
        return cls(split=split, n=n, loss=loss, acc=acc, top5=top5, per_class_acc=per_class, confusion=conf,
                   classes=classes, tta=tta, labels=labels.cpu(), pred=pred.cpu(),
                   confidence=None if confidence is None else confidence.float().cpu())

    @property
    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "acc": self.acc, "top5": self.top5}

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "n": self.n, "loss": self.loss, "acc": self.acc, "top5": self.top5,
                "tta": self.tta, "backend": self.backend,
                "per_class_acc": dict(zip(self.classes, self.per_class_acc, strict=True))}

    def most_confused(self, k: int = 5) -> list[tuple[str, str, int]]:
        """The k largest off-diagonal cells: (true class, predicted class, count)."""
        off = self.confusion.clone()
        off.fill_diagonal_(0)
        vals, idx = off.flatten().topk(min(k, off.numel()))
        c = len(self.classes)
        return [(self.classes[i // c], self.classes[i % c], v) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)
                if v > 0]

    def save(self, folder: Path, prefix: str = "") -> None:
        """confusion.csv, confusion.png, per_class.csv and (with per-image predictions) predictions.csv in
        `folder`."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["true \\ predicted", *self.classes])
        for name, row in zip(self.classes, self.confusion.tolist(), strict=True):
            w.writerow([name, *row])
        write_text(folder / f"{prefix}confusion.csv", buf.getvalue())
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["class", "n", "acc"])
        for name, n, a in zip(self.classes, self.confusion.sum(1).tolist(), self.per_class_acc, strict=True):
            w.writerow([name, n, f"{a:.4f}"])
        write_text(folder / f"{prefix}per_class.csv", buf.getvalue())
        write_bytes(folder / f"{prefix}confusion.png", confusion_png(self))
        if self.pred is not None and self.labels is not None:
            write_text(folder / f"{prefix}predictions.csv", self.predictions_csv())

    def predictions_csv(self) -> str:
        """One row per image in the split's order: index, true class, predicted class, its probability (blank
        where the model gives none)."""
        assert self.pred is not None and self.labels is not None
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["index", "true", "predicted", "confidence"])
        conf = self.confidence.tolist() if self.confidence is not None else [None] * len(self.pred)
        for i, (t, p, c) in enumerate(zip(self.labels.tolist(), self.pred.tolist(), conf, strict=True)):
            w.writerow([i, self.classes[t], self.classes[p], "" if c is None else f"{c:.5f}"])
        return buf.getvalue()

    @staticmethod
    def read_predictions_csv(path: Path, classes: list[str]
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(true class, predicted class, probability) per image from a file predictions_csv wrote, in `classes`'
        order; None when it cannot be read, names another class, or has no probabilities."""
        try:
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error):
            return None
        if not rows or rows[0] != ["index", "true", "predicted", "confidence"]:
            return None
        index = {name: i for i, name in enumerate(classes)}
        try:
            return (torch.tensor([index[r[1]] for r in rows[1:]], dtype=torch.long),
                    torch.tensor([index[r[2]] for r in rows[1:]], dtype=torch.long),
                    torch.tensor([float(r[3]) for r in rows[1:]]))
        except (KeyError, IndexError, ValueError):
            return None

    def __repr__(self) -> str:
        return f"EvalResult({self.split}, n={self.n}, acc={self.acc:.4f}, top5={self.top5:.4f}, loss={self.loss:.4f})"


def confusion_png(result: EvalResult) -> bytes:
    plt = pyplot()
    c = len(result.classes)
    conf = result.confusion.float()
    norm = conf / conf.sum(1, keepdim=True).clamp_min(1)
    size = max(4.0, min(0.55 * c + 2, 20))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if c <= 30:
        ax.set_xticks(range(c), result.classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(c), result.classes, fontsize=8)
        for i in range(c):
            for j in range(c):
                if conf[i, j] > 0:
                    ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.split}: accuracy {result.acc:.2%} (n={result.n})")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    return figure_png(fig, dpi=110)


@torch.inference_mode()
def mean_probability_log(view_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the views' mean softmax probability, (N, C), computed in log space: a class whose probability underflows
    in a view stays finite (averaging softmaxes, then taking the log, gave -inf and an infinite loss)."""
    logp = torch.stack([v.float().log_softmax(1) for v in view_logits])
    return torch.logsumexp(logp, 0) - math.log(len(view_logits))


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    normalizer: Normalizer,
    *,
    batch_size: int = 0,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    tta: str = "none",
    crop_pad: int = 2,
    shard: Dist | None = None,
) -> torch.Tensor:
    """Logits (N, C) in float32 for uint8 images (N, C, H, W), in eval mode, batch by batch (`batch_size` 0: see
    eval_batch_size). With `shard` (training across processes; every rank must call), each rank computes its
    contiguous share and every rank gets all N rows, each image computed once."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta {tta!r} is not one of {TTA_MODES}")
    if shard is not None and shard.active:
        start, end = shard.shard(len(images))
        # a rank whose share is empty (fewer images than ranks) still learns the row width from one image
        part = predict_logits(model, images[start:end] if end > start else images[:1], normalizer,
                              batch_size=batch_size, channels_last=channels_last, amp_dtype=amp_dtype, tta=tta,
                              crop_pad=crop_pad)
        return shard.gather_rows(part[: end - start], len(images))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    bs = eval_batch_size(batch_size, device, images.shape[1:], getattr(model, "backend", "torch"))
    for chunk in images.split(bs):
        x = normalizer(chunk.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device, amp_dtype):  # no graph: evaluation never backpropagates
            if tta == "none":
                logits = model(x).float()
            else:
                views = tta_views(tta, x, crop_pad)
                logits = mean_probability_log([model(v.contiguous(memory_format=torch.channels_last)
                                                     if channels_last else v) for v in views])
        out.append(logits)
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(
    model: nn.Module,
    data: ImageSet,
    normalizer: Normalizer,
    *,
    split: str = "test",
    batch_size: int = 0,
    channels_last: bool = False,
    amp_dtype: torch.dtype | None = None,
    tta: str = "none",
    crop_pad: int = 2,
    shard: Dist | None = None,
) -> EvalResult:
    """Accuracy, top-5, loss, per-class accuracy and the confusion matrix of `model` on `data` (`shard`: see
    predict_logits)."""
    logits = predict_logits(model, data.images, normalizer, batch_size=batch_size, channels_last=channels_last,
                            amp_dtype=amp_dtype, tta=tta, crop_pad=crop_pad, shard=shard)
    labels = data.labels.to(logits.device)
    n = len(labels)
    k = min(5, data.num_classes)
    top5 = (logits.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item() if n else 0.0
    loss = F.cross_entropy(logits, labels).item() if n else float("nan")
    confidence, pred = logits.float().softmax(1).max(1)
    return EvalResult.from_predictions(pred, labels, data.classes, split=split, loss=loss, top5=top5, tta=tta,
                                       confidence=confidence)
