"""LeNet-5 (LeCun et al., 1998): CONV-POOL-CONV-POOL-FC-FC-FC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .layers import Classifier, activation


class LeNet5(Classifier):
    """C1 6@5x5 - S2 pool - C3 16@5x5 - S4 pool - F5 120 - F6 84 - output.

    The paper feeds 32x32 images, MNIST's 28x28 padded by 2: C1 pads by 2 for inputs under 32, and
    inputs under 28 are zero-padded up to 28. Larger inputs are pooled to S4's 5x5 before F5.
    """

    stage_paths = ("features.2", "features.5")

    def __init__(self, in_chans: int, num_classes: int, image_size: tuple[int, int], act: str, pool: str):
        super().__init__()
        h, w = image_size
        self.min_size = 28
        c1_pad = 2 if min(h, w) < 32 else 0
        pool_layer = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5, padding=c1_pad), activation(act, 6), pool_layer(2),
            nn.Conv2d(6, 16, 5), activation(act, 16), pool_layer(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.pool = nn.Flatten(1)
        self.fc = nn.Sequential(nn.Linear(16 * 5 * 5, 120), activation(act, 120),
                                nn.Linear(120, 84), activation(act, 84))
        self.head = nn.Linear(84, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            ph, pw = max(self.min_size - h, 0), max(self.min_size - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc(self.pool(x))
        return x if pre_logits else self.head(x)


@register_model(family="lenet")
def lenet5(
    *, in_chans: int, num_classes: int, image_size: tuple[int, int], act: str = "relu", pool: str = "max"
) -> nn.Module:
    """LeNet-5 (ReLU and max-pooling by default; act='tanh', pool='avg' for the 1998 original)."""
    return LeNet5(in_chans, num_classes, image_size, act, pool)
