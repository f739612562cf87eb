"""Losses by name: softmax cross-entropy (with label smoothing) and the multiclass SVM hinge loss.

Both accept integer labels or the MixedTargets of mixup/cutmix (the loss of each label set,
weighted by the mixing coefficient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import LossConfig
from ..data.augment import MixedTargets
from ..errors import VisrecError, unknown_name


class Loss:
    name = ""

    def per_label(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor | MixedTargets) -> torch.Tensor:
        logits = logits.float()
        if isinstance(targets, MixedTargets):
            lam = targets.lam
            return lam * self.per_label(logits, targets.a) + (1 - lam) * self.per_label(logits, targets.b)
        return self.per_label(logits, targets)


class CrossEntropy(Loss):
    """-log softmax(s)_y, averaged; with smoothing e, the target is (1-e) one-hot + e uniform."""

    name = "cross_entropy"

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise VisrecError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = label_smoothing

    def per_label(self, logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def __repr__(self) -> str:
        return f"CrossEntropy(label_smoothing={self.label_smoothing})"


class Hinge(Loss):
    """Multiclass SVM (Weston-Watkins): mean over the batch of sum_{j != y} max(0, s_j - s_y + margin)."""

    name = "hinge"

    def __init__(self, margin: float = 1.0):
        if margin <= 0:
            raise VisrecError(f"loss.margin={margin} must be > 0")
        self.margin = margin

    def per_label(self, logits, labels):
        correct = logits.gather(1, labels[:, None])  # (B, 1)
        margins = (logits - correct + self.margin).clamp_min(0)  # (B, C)
        margins = margins.scatter(1, labels[:, None], 0.0)  # the correct class contributes nothing
        return margins.sum(1).mean()

    def __repr__(self) -> str:
        return f"Hinge(margin={self.margin})"


LOSSES = {"cross_entropy": CrossEntropy, "hinge": Hinge}


def build_loss(cfg: LossConfig) -> Loss:
    if cfg.name == "cross_entropy":
        return CrossEntropy(cfg.label_smoothing)
    if cfg.name == "hinge":
        return Hinge(cfg.margin)
    raise unknown_name("loss", cfg.name, LOSSES, "loss.name")
