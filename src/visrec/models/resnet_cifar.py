"""CIFAR-style ResNets (He et al., 2016, section 4.2): 6n+2 layers, widths 16/32/64.

`widths` widens them in the manner of wide ResNets (Zagoruyko & Komodakis, 2016), keeping the basic blocks and
option-A shortcuts: `model.kwargs.widths=[32,64,128]` is ResNet-20 twice as wide (about 4x the compute).

Shortcuts that change shape use the paper's option A (stride-2 subsampling and zero-padded
channels), so the networks have the paper's parameter counts: ResNet-20 0.27M, -56 0.85M, -110 1.7M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VisrecError
from ._registry import register_model
from .layers import Classifier, DropPath, GlobalPool, init_residual


class PadShortcut(nn.Module):
    """Option A: identity on a stride-2 grid, extra channels filled with zeros."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.drop_path(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x), inplace=True)


class CifarResNet(Classifier):
    stage_paths = ("stages.0", "stages.1", "stages.2")

    def __init__(self, depth: int, in_chans: int, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64),
                 drop_path: float = 0.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if len(widths) != 3 or any(int(w) != w or w < 1 for w in widths):
            raise VisrecError(f"resnet{depth} widths {list(widths)} must be 3 positive whole numbers, one per stage",
                              "e.g. model.kwargs.widths=[16,32,64] (the paper's) or [32,64,128] (twice as wide)")
        widths = tuple(int(w) for w in widths)
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = GlobalPool("avg")
        self.head = nn.Linear(cin, num_classes)
        init_residual(self, drop_path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H, W) -> (B, 64, H/4, W/4)


def _make(depth: int):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], drop_path: float = 0.0,
              widths: tuple[int, ...] = (16, 32, 64)) -> nn.Module:
        return CifarResNet(depth, in_chans, num_classes, tuple(widths), drop_path=drop_path)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR-style ResNet-{depth} ({(depth - 2) // 6} basic blocks per stage, option-A shortcuts)."
    return build


for _depth in (20, 32, 44, 56, 110):
    register_model(_make(_depth), family="resnet_cifar")
