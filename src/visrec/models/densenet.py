"""DenseNet-BC (Huang et al., 2017) on torchvision's implementation: DenseNet-121/161/169/201 (its weight
files load), and the paper's CIFAR network DenseNet-BC-100 (growth rate 12, three dense blocks).

`stem="small"` (automatic under 96 px, and always for the CIFAR network) replaces the 7x7 stride-2
convolution and its max-pool with one 3x3 stride-1 convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet as _TvDenseNet

from ._registry import register_model
from .layers import Classifier, resolve_stem


class DenseNet(Classifier, _TvDenseNet):
    head_path = "classifier"

    def __init__(self, growth: int, blocks: tuple[int, ...], init_features: int, *, in_chans: int, num_classes: int,
                 stem: str, drop_rate: float, memory_efficient: bool):
        _TvDenseNet.__init__(self, growth, blocks, init_features, drop_rate=drop_rate, num_classes=num_classes,
                             memory_efficient=memory_efficient)
        if stem == "small":
            self.features.conv0 = nn.Conv2d(in_chans, init_features, 3, 1, 1, bias=False)
            self.features.pool0 = nn.Identity()
        elif in_chans != 3:
            self.features.conv0 = nn.Conv2d(in_chans, init_features, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(self.features.conv0.weight)
        self.stage_paths = tuple(f"features.denseblock{i + 1}" for i in range(len(blocks)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)


def _make(name: str, growth: int, blocks: tuple[int, ...], init_features: int, cifar: bool = False):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto",
              drop_rate: float = 0.0, memory_efficient: bool = False) -> nn.Module:
        stem = "small" if cifar and stem == "auto" else resolve_stem(stem, image_size)
        return DenseNet(growth, blocks, init_features, in_chans=in_chans, num_classes=num_classes, stem=stem,
                        drop_rate=drop_rate, memory_efficient=memory_efficient)

    build.__name__ = name
    layers = "-".join(map(str, blocks))
    build.__doc__ = (f"DenseNet-BC{'-100, CIFAR layout,' if cifar else ''} growth {growth}, dense blocks {layers}"
                     f"{' (memory_efficient=True trades compute for memory)' if not cifar else ''}.")
    return build


for _n, _g, _b, _i in (("densenet121", 32, (6, 12, 24, 16), 64), ("densenet161", 48, (6, 12, 36, 24), 96),
                       ("densenet169", 32, (6, 12, 32, 32), 64), ("densenet201", 32, (6, 12, 48, 32), 64)):
    register_model(_make(_n, _g, _b, _i), family="densenet")
register_model(_make("densenet_bc100", 12, (16, 16, 16), 24, cifar=True), family="densenet")
