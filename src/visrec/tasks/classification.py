"""Image classification: one class per image, softmax (or multiclass SVM) loss, accuracy as the primary metric,
top-5, per-class accuracy and the confusion matrix on evaluation, and flip/crop/scale test-time augmentation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data import Dataset, ImageSet, Normalizer
from ..data.augment import MixedTargets
from ..errors import VisrecError
from ..evaluate import EvalResult, evaluate, resolve_crop_pad, resolve_tta
from ..prediction import Answer, Predictor, Prepared, class_scores
from ..training.losses import build_loss
from ..training.task import EvalSettings, Task


class ClassificationPredictor(Predictor):
    """The top-k classes with probabilities, with the run's test-time augmentation."""

    tta = True
    explanations = ("gradcam",)

    def answer(self, items: list[Prepared], outputs: torch.Tensor, top_k: list[int]) -> list[Answer]:
        return list(class_scores(outputs, self.classes, top_k))


class ClassificationTask(Task):
    name = "classification"
    Predictor = ClassificationPredictor
    tta_eval = True  # visrec eval compares flips, crops and scales, with the confusion matrix
    distills = True  # teachers' probabilities over the same classes
    linear_probe = True  # the classifier is the whole head
    class_scores = True  # one logit per class
    progressive_resize = True  # a label does not move when the image shrinks
    ddp_unused_parameters = False  # every parameter gets a gradient every step
    target = "class"
    primary = "acc"
    maximize = True
    stats = ("acc",)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.loss_fn = build_loss(self.cfg.loss)
        self.tta = resolve_tta(self.cfg.eval.tta, self.cfg.data.augment)
        self.crop_pad = resolve_crop_pad(self.cfg.eval.crop_pad, self.cfg.data.augment)

    def check(self, ds: Dataset) -> None:
        if ds.num_classes < 2:
            raise VisrecError(f"{ds.name} has {ds.num_classes} class ({', '.join(ds.classes)}); a classifier needs at "
                              "least 2", "put each class's images in its own subfolder (folder:PATH/<class>/*)")

    def num_outputs(self, ds: Dataset) -> int:
        return ds.num_classes

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return self.loss_fn(outputs, targets)

    def batch_stats(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        labels = targets.a if isinstance(targets, MixedTargets) else targets
        return (outputs.argmax(1) == labels).sum().view(1)  # correct predictions

    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> EvalResult:
        return evaluate(model, data, normalizer, split=split, batch_size=settings.batch_size,
                        channels_last=settings.channels_last, amp_dtype=settings.amp_dtype, tta=self.tta,
                        crop_pad=self.crop_pad, shard=settings.shard)

    def at_chance(self, test: EvalResult, ds: Dataset) -> str | None:
        counts = torch.bincount(ds.test.labels, minlength=ds.num_classes)
        guess = counts.max().item() / max(1, counts.sum().item())  # always the most frequent class
        if test.acc <= guess + 0.02:
            return (f"test accuracy {test.acc:.2%} is at chance: always answering the most frequent class scores "
                    f"{guess:.2%}")
        return None

    def summary_fields(self, test: EvalResult | None) -> dict[str, Any]:
        out: dict[str, Any] = {"tta": self.tta}
        if test is not None:
            out["most_confused"] = [list(t) for t in test.most_confused(5)]
        return out
