"""Semantic segmentation: a class for every pixel (index 0 is visrec's own background, the dataset's classes
follow from 1), from a dense network (`unet`, `fcn`) that outputs (batch, classes + 1, H, W).

The per-pixel target comes from the data: a `semantic` mask when the data has one, else the instance masks and
box labels of scenes and COCO folders (pixel of instance k -> that object's class + 1). Flips and crops move
the masks with the pixels; a crop's padding is background.

Loss: pixel cross-entropy (`task.seg_loss=ce`), or its sum with the soft Dice loss (`ce+dice`). Pixels labelled
`task.ignore_index` (default 255) count in no loss and no metric.

Metrics: `pix_acc` and `miou` from one confusion matrix over the whole split (every pixel of every image), the
mean of the per-class IoUs over the classes present in the truth or the predictions: averaging per-image scores
gives other numbers. `miou` is the primary metric; per-class IoUs are written to `per_class_iou.csv`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Range
from ..data import Dataset, ImageSet, Normalizer
from ..device import autocast
from ..errors import VisrecError
from ..evaluate import predict_logits
from ..io import atomic_path, write_json
from ..prediction import Answer, Predictor, Prepared, hex_color, overlay_png, png_data_uri
from ..training.task import EvalSettings, Evaluation, Task

BACKGROUND = "(background)"


def semantic_targets(data: ImageSet) -> torch.Tensor:
    """(N, H, W) uint8 class map: 0 background, k + 1 for class k."""
    t = data.targets or {}
    if "semantic" in t:
        return t["semantic"]
    if hasattr(t["instances"], "kind"):  # streamed: class maps drawn when read, as the instance maps are
        return t["instances"].kind("semantic")
    inst, labels = t["instances"].long(), t["box_labels"]
    cls = torch.cat([torch.full((len(labels), 1), -1, dtype=labels.dtype), labels], 1)  # slot 0: no object
    return (cls.gather(1, inst.flatten(1)).view_as(inst) + 1).clamp_min(0).to(torch.uint8)


def confusion(pred: torch.Tensor, true: torch.Tensor, k: int, ignore: int) -> torch.Tensor:
    """(k, k) pixel counts, rows the truth, columns the prediction; `ignore` pixels left out."""
    keep = true != ignore
    idx = true[keep].long() * k + pred[keep].long()
    return torch.bincount(idx, minlength=k * k).view(k, k)


def iou_from_confusion(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU and whether the class occurs at all (in the truth or the predictions)."""
    cm = cm.double()
    inter = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - inter
    return inter / union.clamp_min(1), union > 0


@dataclass
class SegmentationEvaluation(Evaluation):
    classes: list[str] = field(default_factory=list)
    per_class_iou: list[float | None] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, **self.metrics,
                "per_class_iou": dict(zip(self.classes, self.per_class_iou, strict=True))}

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / "pixel_confusion.json", {"classes": self.classes, "rows": "true class",
                                                           "columns": "predicted class", "pixels": self.confusion})
        with atomic_path(Path(folder) / "per_class_iou.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "iou", "pixels"])
            for name, iou, row in zip(self.classes, self.per_class_iou, self.confusion, strict=True):
                w.writerow([name, "" if iou is None else f"{iou:.6f}", sum(row)])


@dataclass
class PixelClasses(Answer):
    """Each class's share of the input's pixels, the legend's colors, and the class map over the input (a PNG data
    URI at the input's own size, background transparent)."""

    pixels: dict[str, float]
    legend: dict[str, str]
    mask: str
    rgba: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"pixels": self.pixels, "legend": self.legend, "mask": self.mask}

    def text(self) -> str:
        return ", ".join(f"{c} {v:.1%}" for c, v in sorted(self.pixels.items(), key=lambda kv: -kv[1])) + \
            " of the pixels"

    def draw(self, item: Prepared) -> bytes:
        return overlay_png(item, mask=self.rgba)


class SegmentationPredictor(Predictor):
    draws = True

    def answer(self, items: list[Prepared], outputs: torch.Tensor, top_k: list[int]) -> list[Answer]:
        import numpy as np

        names = ["(background)", *self.classes]
        res: list[Answer] = []
        for p, logits in zip(items, outputs.float(), strict=True):
            fw, fh = self.upload_scale(p)  # a letterbox: only its image part is the input
            rh = max(1, round(logits.shape[-2] * p.height / fh))
            rw = max(1, round(logits.shape[-1] * p.width / fw))
            up = F.interpolate(logits[None, :, :rh, :rw], size=(p.height, p.width), mode="bilinear",
                               align_corners=False)[0]
            cls = up.argmax(0)
            counts = torch.bincount(cls.flatten(), minlength=len(names)).tolist()
            total = max(1, p.height * p.width)
            rgba = np.zeros((p.height, p.width, 4), dtype=np.uint8)
            c = cls.numpy()
            rgba[..., :3] = self.colors[c]
            rgba[..., 3] = np.where(c > 0, 150, 0)
            res.append(PixelClasses({names[k]: round(n / total, 6) for k, n in enumerate(counts) if n},
                                    {names[k]: hex_color(self.colors[k]) for k in range(1, len(names))},
                                    png_data_uri(rgba), rgba))
        return res


@dataclass
class SegmentationOptions:
    seg_loss: Literal["ce", "ce+dice"] = "ce"  # pixel cross-entropy, optionally plus soft Dice
    ignore_index: Annotated[int, Range(0, 255)] = 255  # pixels of this label count nowhere


class SegmentationTask(Task):
    name = "segmentation"
    Options = SegmentationOptions
    Predictor = SegmentationPredictor
    # every image holds thousands of pixel examples: small batches (more steps for the same pixels) train a U-Net
    # far faster than classification's 256 (3 epochs of 3,000 scenes: mIoU 0.11 at 256, 0.37 at 16 with lr 0.1)
    recipe = {"model.name": "unet", "train.batch_size": 16, "optim.lr": 0.1}
    random_crops = False  # targets in the images' pixels (or words about them): images read whole
    target = "semantic"
    primary = "miou"
    maximize = True
    stats = ("pix_acc",)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.ignore, self.seg_loss = self.options.ignore_index, self.options.seg_loss
        self.classes: list[str] = []

    def check(self, ds: Dataset) -> None:
        t = ds.train.targets or {}
        if "semantic" not in t and "instances" not in t:
            raise VisrecError(f"task segmentation needs per-pixel labels, and {ds.name} has none",
                              "use scenes, or a coco:PATH folder with segmentation polygons or RLE masks")
        if ds.num_classes + 1 > 255:
            raise VisrecError(f"{ds.name} has {ds.num_classes} classes; segmentation masks hold at most 254")
        self.classes = [BACKGROUND, *ds.classes]

    def num_outputs(self, ds: Dataset) -> int:
        self.classes = [BACKGROUND, *ds.classes]
        return ds.num_classes + 1

    def check_model(self, model: nn.Module, ds: Dataset) -> None:
        super().check_model(model, ds)
        if not getattr(model, "dense_output", False):
            raise VisrecError(f"task segmentation needs a network that scores every pixel; {type(model).__name__} "
                              "outputs one score per class", "use --model unet (or fcn)")

    def targets(self, data: ImageSet) -> dict[str, torch.Tensor]:
        return {"semantic": semantic_targets(data)}

    def chance_loss(self, outputs: int, targets: Any = None) -> float:
        return math.log(outputs)  # every pixel's class guessed uniformly

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        y = targets["semantic"].long()
        logits = outputs.float()
        loss = F.cross_entropy(logits, y, ignore_index=self.ignore)
        if self.seg_loss == "ce+dice":
            keep = (y != self.ignore).unsqueeze(1).float()
            prob = logits.softmax(1) * keep
            onehot = F.one_hot(torch.where(y == self.ignore, 0, y), logits.shape[1]).permute(0, 3, 1, 2) * keep
            inter, total = (prob * onehot).sum((0, 2, 3)), (prob + onehot).sum((0, 2, 3))
            loss = loss + (1 - (2 * inter + 1) / (total + 1)).mean()
        return loss

    def batch_stats(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        y = targets["semantic"].long()
        keep = y != self.ignore
        right = ((outputs.argmax(1) == y) & keep).flatten(1).sum(1).float()
        return (right / keep.flatten(1).sum(1).clamp_min(1)).sum().view(1)  # per image, summed

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> SegmentationEvaluation:
        device = next(model.parameters()).device
        k = len(self.classes) or len(data.classes) + 1
        y_all = semantic_targets(data)
        cm = torch.zeros(k, k, dtype=torch.long)
        loss_sum, n = 0.0, 0
        fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        was = model.training
        model.eval()
        try:
            for x, y in zip(data.images.split(settings.batch_size), y_all.split(settings.batch_size), strict=True):
                x = normalizer(x.to(device)).contiguous(memory_format=fmt)
                with autocast(device, settings.amp_dtype):
                    out = model(x)
                out, y = out.float(), y.to(device)
                loss_sum += float(self.loss(out, {"semantic": y})) * len(x)
                n += len(x)
                cm += confusion(out.argmax(1), y.long(), k, self.ignore).cpu()
        finally:
            model.train(was)
        iou, present = iou_from_confusion(cm)
        total = cm.sum().item()
        metrics = {"loss": loss_sum / n if n else float("nan"),
                   "pix_acc": cm.diagonal().sum().item() / total if total else 0.0,
                   "miou": iou[present].mean().item() if bool(present.any()) else 0.0}
        return SegmentationEvaluation(split, metrics, classes=list(self.classes),
                                      per_class_iou=[float(v) if p else None for v, p in zip(iou, present,
                                                                                             strict=True)],
                                      confusion=cm.tolist())

    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 6,
                folder: Path | None = None) -> dict[str, bytes]:
        from ..plotting import figure_png, pyplot

        n = min(n, len(data))
        if n == 0:
            return {}
        out = {}
        x8 = data.images[:n]
        pred = predict_logits(model, x8, normalizer).argmax(1).cpu()
        truth = semantic_targets(data)[:n].long()
        k = max(len(self.classes), int(truth.max()) + 1, int(pred.max()) + 1)
        plt = pyplot()
        fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.2 * n), squeeze=False)
        for i in range(n):
            img = x8[i].permute(1, 2, 0).numpy()
            gray = img.shape[2] == 1
            panels = ((axes[i, 0], img[..., 0] if gray else img, "image"), (axes[i, 1], truth[i].numpy(), "truth"),
                      (axes[i, 2], pred[i].numpy(), "prediction"))
            for ax, shown, title in panels:
                if title == "image":
                    ax.imshow(shown, cmap="gray" if gray else None)
                else:
                    ax.imshow(shown, cmap="tab20", vmin=0, vmax=max(k - 1, 1), interpolation="nearest")
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        out["Test images: the image, its true class map and the predicted one (one color per class, background "
            "first)"] = figure_png(fig, dpi=90)
        if folder is not None and (Path(folder) / "pixel_confusion.json").is_file():
            out["Pixel confusion matrix of the test split: each true class's pixels by predicted class (row fractions)"
                ] = pixel_confusion_png(Path(folder) / "pixel_confusion.json")
        return out

    def at_chance(self, test: Evaluation, ds: Dataset) -> str | None:
        if test.metrics.get("miou", 1.0) <= 1.0 / max(len(self.classes), 1):
            return f"test mIoU {test.metrics['miou']:.3f} is no better than labelling every pixel background"
        return None


def pixel_confusion_png(path: Path) -> bytes:
    """The pixel confusion matrix a test evaluation saved, normalized by row (each true class's pixels)."""
    import json

    from ..plotting import figure_png, pyplot

    doc = json.loads(Path(path).read_text())
    classes, cm = doc["classes"], torch.tensor(doc["pixels"], dtype=torch.float64)
    norm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    k = len(classes)
    plt = pyplot()
    size = max(4.0, min(0.55 * k + 2, 16))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.0%}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class's pixels")
    return figure_png(fig, dpi=100)
