"""Classification + localization: one object per image, its class and its box, from one network.

Any zoo classifier becomes a localizer by widening its head: C class scores, then 4 box numbers (or 4 per class
with `task.per_class_boxes`). The box is predicted as (center x, center y, width, height), each squashed into
[0, 1] of the image by a sigmoid, so it always lies on the image. The loss is the classification loss plus
`task.box_weight` times the box loss (`task.box_loss`: l1, smooth_l1, giou or l1+giou, on boxes in image
fractions).

Metrics: `acc` (the class), `iou` (mean intersection over union of the predicted and true box) and `loc_acc`,
the share of images with the class right and IoU >= 0.5 (the ImageNet localization criterion), the primary
metric. An image whose object a random crop cut away (its label -1) counts in no term of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from ..config import NonNeg
from ..data import Dataset, ImageSet, Normalizer
from ..errors import VisrecError
from ..evaluate import predict_logits
from ..prediction import Answer, ClassScores, Predictor, Prepared, class_scores, overlay_png
from ..training.task import EvalSettings, Evaluation, Task


def pair_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of box a[i] with box b[i] (xyxy), for each i: the diagonal of torchvision's pairwise IoU."""
    if len(a) == 0:
        return a.new_zeros(0)
    return torch.cat([box_iou(x, y).diagonal() for x, y in zip(a.split(512), b.split(512), strict=True)])


@dataclass
class LocatedObject(ClassScores):
    """The top-k classes and the box of the best one (x0, y0, x1, y1 in the input's own pixels)."""

    box: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "box": self.box}

    def text(self) -> str:
        (c, p), *rest = self.top
        return f"{c} {p:.1%} at {[round(v) for v in self.box]}" + "".join(f", {c} {p:.1%}" for c, p in rest)

    def draw(self, item: Prepared) -> bytes:
        return overlay_png(item, box=self.box)


class LocalizationPredictor(Predictor):
    explanations = ("gradcam",)
    draws = True

    def setup(self) -> None:
        self.splitter = type(self.task)(self.cfg)
        self.splitter.num_classes = len(self.classes)

    def answer(self, items: list[Prepared], outputs: torch.Tensor, top_k: list[int]) -> list[Answer]:
        logits, boxes = self.splitter.split_outputs(outputs.float())
        out: list[Answer] = []
        for scores, p, b in zip(class_scores(logits, self.classes, top_k), items, boxes, strict=True):
            fw, fh = self.upload_scale(p)
            box = [round(float(v), 2) for v in (b.clamp(0, 1) * torch.tensor([fw, fh, fw, fh])).tolist()]
            out.append(LocatedObject(scores.top, box))
        return out


@dataclass
class LocalizationOptions:
    box_loss: Literal["l1", "smooth_l1", "giou", "l1+giou"] = "smooth_l1"  # the box term of the loss
    box_weight: NonNeg = 1.0  # weight of the box term next to the class term
    per_class_boxes: bool = False  # one box per class (else one class-agnostic box)


class LocalizationTask(Task):
    name = "localization"
    Options = LocalizationOptions
    Predictor = LocalizationPredictor
    random_crops = False  # targets in the images' pixels (or words about them): images read whole
    target = "boxes"
    primary = "loc_acc"
    maximize = True
    stats = ("acc", "iou", "loc_acc")

    def __init__(self, cfg=None):
        super().__init__(cfg)
        o = self.options
        self.box_loss_name, self.box_weight, self.per_class = o.box_loss, o.box_weight, o.per_class_boxes
        self.num_classes = 0

    # ---------------------------------------------------------------- data and model

    def check(self, ds: Dataset) -> None:
        for split, data in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
            if data is None:
                continue
            t = data.targets or {}
            if "boxes" not in t:
                raise VisrecError(f"task localization needs boxes, and {ds.name} has none",
                                  "use a dataset with boxes: scenes (data.max_objects=1), coco:PATH or yolo:PATH")
            n = (t["box_labels"] >= 0).sum(1)
            if not bool((n == 1).all()):
                bad = int((n != 1).nonzero()[0])
                raise VisrecError(f"task localization takes exactly one object per image, and {split} image {bad} "
                                  f"of {ds.name} has {int(n[bad])}",
                                  "for scenes, --set data.max_objects=1; several objects per image are detection")
        self.num_classes = ds.num_classes

    def num_outputs(self, ds: Dataset) -> int:
        self.num_classes = ds.num_classes
        return self._width()

    def _width(self) -> int:
        """C class scores, then a box: 4 numbers, or 4 per class."""
        return self.num_classes * (5 if self.per_class else 1) + (0 if self.per_class else 4)

    def targets(self, data: ImageSet) -> dict[str, torch.Tensor]:
        t = data.targets
        first = (t["box_labels"] >= 0).float().argmax(1)  # the one object's slot
        rows = torch.arange(len(first))
        size = torch.tensor([data.images.shape[-1], data.images.shape[-2]] * 2, dtype=torch.float32)
        # one box per image, as the geometric augmentations expect: (N, 1, 4) pixels and (N, 1) labels
        return {"boxes": t["boxes"][rows, first][:, None].float(), "box_labels": t["box_labels"][rows, first][:, None],
                "size": size.expand(len(first), 4).clone()}

    # ---------------------------------------------------------------- outputs

    def split_outputs(self, outputs: torch.Tensor, labels: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits (B, C), boxes (B, 4) xyxy in image fractions). Per-class boxes: the box of `labels`
        (the true class in training), else of the predicted class."""
        c = self.num_classes
        logits = outputs[:, :c].float()
        raw = outputs[:, c:].float()
        if self.per_class:
            pick = logits.argmax(1) if labels is None else labels.clamp_min(0)
            raw = raw.view(len(raw), c, 4)[torch.arange(len(raw), device=raw.device), pick]
        cx, cy, w, h = raw.sigmoid().unbind(1)
        return logits, torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)

    @staticmethod
    def _truth(targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = targets["box_labels"][:, 0]
        return labels, targets["boxes"][:, 0] / targets["size"]

    def _box_loss(self, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        if self.box_loss_name == "l1":
            return F.l1_loss(pred, true, reduction="none").sum(1)
        if self.box_loss_name == "smooth_l1":
            return F.smooth_l1_loss(pred, true, reduction="none", beta=0.05).sum(1)
        giou = generalized_box_iou_loss(pred, true, reduction="none")
        if self.box_loss_name == "l1+giou":  # DETR's pair: L1 pulls the coordinates, GIoU the overlap
            return giou + F.l1_loss(pred, true, reduction="none").sum(1)
        return giou

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        labels, true = self._truth(targets)
        logits, boxes = self.split_outputs(outputs, labels)
        keep = (labels >= 0).float()
        cls = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
        per_image = cls + self.box_weight * self._box_loss(boxes, true)
        return (per_image * keep).sum() / keep.sum().clamp_min(1)

    def batch_stats(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        labels, true = self._truth(targets)
        logits, boxes = self.split_outputs(outputs)
        right = logits.argmax(1) == labels
        iou = pair_iou(boxes, true)
        return torch.stack([right.float().sum(), iou.sum(), (right & (iou >= 0.5)).float().sum()])

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> Evaluation:
        targets = self.targets(data)
        out = predict_logits(model, data.images, normalizer, batch_size=settings.batch_size,
                             channels_last=settings.channels_last, amp_dtype=settings.amp_dtype).cpu()
        if not len(out):
            out = torch.zeros(0, self._width())
        labels, true = self._truth(targets)
        logits, boxes = self.split_outputs(out)
        right = logits.argmax(1) == labels
        iou = pair_iou(boxes, true)
        n = max(len(labels), 1)
        return Evaluation(split, {"loss": float(self.loss(out, targets)) if len(out) else float("nan"),
                                  "acc": right.float().sum().item() / n, "iou": iou.sum().item() / n,
                                  "loc_acc": (right & (iou >= 0.5)).float().sum().item() / n})

    def at_chance(self, test: Evaluation, ds: Dataset) -> str | None:
        if test.metrics.get("loc_acc", 1.0) <= 0.02:
            return (f"no test image was localized (class right and IoU >= 0.5: {test.metrics['loc_acc']:.1%}; mean "
                    f"IoU {test.metrics.get('iou', 0):.2f})")
        return None

    def summary_fields(self, test: Evaluation | None) -> dict[str, Any]:
        return {"box_loss": self.box_loss_name, "box_weight": self.box_weight, "per_class_boxes": self.per_class}

    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 8,
                folder: Path | None = None) -> dict[str, bytes]:
        from matplotlib.patches import Rectangle

        from ..plotting import figure_png
        from .draw import image_grid

        found = self.examples(model, data, normalizer, n)
        if found is None:
            return {}
        x8, out, targets = found
        n = len(x8)
        labels, true = self._truth(targets)
        logits, boxes = self.split_outputs(out)
        pred, iou = logits.argmax(1), pair_iou(boxes, true)
        h, w = x8.shape[-2:]
        fig, axes = image_grid(x8, panel_height=2.9)
        for i in range(n):
            ax = axes.flat[i]
            for box, color, style in ((true[i], "#27ae60", "-"), (boxes[i], "#c0392b", "--")):
                x0, y0, x1, y1 = (box * torch.tensor([w, h, w, h])).tolist()
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=color, lw=1.5, ls=style))
            names = data.classes
            ax.set_title(f"{names[int(labels[i])]} / {names[int(pred[i])]}\nIoU {iou[i]:.2f}", fontsize=8,
                         color="black" if pred[i] == labels[i] and iou[i] >= 0.5 else "#c0392b")
        return {"Test images: true box (green) and predicted box (red, dashed); titles: true / predicted class":
                figure_png(fig, dpi=100)}
