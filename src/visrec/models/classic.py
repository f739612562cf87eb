"""The course's first models: a linear classifier and the two-layer fully-connected net."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._registry import register_model
from .layers import Classifier, activation


class Linear(Classifier):
    """Scores = W x + b on the flattened image: the linear classifier of the course."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.pool = nn.Identity()
        self.head = nn.Linear(in_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, C, H, W) -> (B, C*H*W)


class MLP(Classifier):
    """affine -> activation -> affine: the two-layer net (more hidden layers with `depth`)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, depth: int, act: str, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(d, hidden), activation(act, hidden)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = hidden
        self.body = nn.Sequential(*layers)
        self.pool = nn.Identity()
        self.head = nn.Linear(d, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


@register_model(family="linear")
def linear(*, in_chans: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """Linear classifier on raw pixels (softmax or SVM by the loss)."""
    return Linear(in_chans * math.prod(image_size), num_classes)


@register_model(family="mlp")
def mlp(
    *, in_chans: int, num_classes: int, image_size: tuple[int, int],
    hidden: int = 256, depth: int = 2, act: str = "relu", dropout: float = 0.0,
) -> nn.Module:
    """Two-layer fully-connected net: affine - ReLU - affine."""
    return MLP(in_chans * math.prod(image_size), num_classes, hidden, depth, act, dropout)
