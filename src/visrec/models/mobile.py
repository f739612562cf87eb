"""Small-footprint networks: SqueezeNet 1.0 / 1.1 (Iandola et al., 2016; torchvision's implementation, its
weight files load) and MobileNet v1 (Howard et al., 2017: depthwise-separable convolutions).

SqueezeNet's classifier is torchvision's: dropout, a 1x1 convolution to the classes, ReLU and global
average pooling, so its head is that convolution (`classifier.1`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import SqueezeNet as _TvSqueezeNet

from ._registry import register_model
from .layers import Classifier, activation, norm_layer, resolve_stem, swap_layers


class SqueezeNet(Classifier, _TvSqueezeNet):
    head_path = "classifier.1"

    def __init__(self, version: str, in_chans: int, num_classes: int, stem: str, dropout: float, act: str):
        _TvSqueezeNet.__init__(self, version, num_classes=num_classes, dropout=dropout)
        first = self.features[0]
        if stem == "small":
            self.features[0] = nn.Conv2d(in_chans, first.out_channels, 3, 1, 1)
        elif in_chans != 3:
            self.features[0] = nn.Conv2d(in_chans, first.out_channels, first.kernel_size, first.stride)
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self.stage_paths = tuple(f"features.{i}" for i in pools) + (f"features.{len(self.features) - 1}",)
        swap_layers(self, act)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:  # the pooled features (the logits themselves pool after the 1x1 convolution)
            return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return torch.flatten(self.classifier(x), 1)

    def reset_classifier(self, num_classes: int) -> None:
        old = self.classifier[1]
        self.classifier[1] = nn.Conv2d(old.in_channels, num_classes, 1, device=old.weight.device)

    @property
    def num_features(self) -> int:
        return self.classifier[1].in_channels


def _make_squeeze(version: str):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto",
              dropout: float = 0.5, act: str = "relu") -> nn.Module:
        return SqueezeNet(version, in_chans, num_classes, resolve_stem(stem, image_size), dropout, act)

    build.__name__ = f"squeezenet{version}"
    build.__doc__ = f"SqueezeNet {version.replace('_', '.')} (fire modules: 1x1 squeeze, 1x1 + 3x3 expand)."
    return build


for _v in ("1_0", "1_1"):
    register_model(_make_squeeze(_v), family="squeezenet")


def _separable(cin: int, cout: int, stride: int, act: str, norm: str) -> nn.Sequential:
    """Depthwise 3x3 (one filter per channel) - norm - act - pointwise 1x1 - norm - act."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), norm_layer(norm, cin), activation(act, cin),
        nn.Conv2d(cin, cout, 1, bias=False), norm_layer(norm, cout), activation(act, cout),
    )


_MOBILENET = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class MobileNetV1(Classifier):
    """MobileNet v1: a 3x3 stride-2 convolution, 13 depthwise-separable layers, global average pooling, linear
    head; `width` is the paper's width multiplier alpha. The small stem makes the first convolution stride 1."""

    stage_paths = ("layers.1", "layers.3", "layers.5", "layers.11", "layers.13")

    def __init__(self, in_chans: int, num_classes: int, stem: str, width: float, act: str, norm: str):
        super().__init__()

        def w(c: int) -> int:
            return max(8, int(c * width))

        first = nn.Conv2d(in_chans, w(32), 3, 1 if stem == "small" else 2, 1, bias=False)
        layers: list[nn.Module] = [nn.Sequential(first, norm_layer(norm, w(32)), activation(act, w(32)))]
        cin = w(32)
        for cout, stride in _MOBILENET:
            layers.append(_separable(cin, w(cout), stride, act, norm))
            cin = w(cout)
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_model(family="mobilenet")
def mobilenet_v1(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto",
                 width: float = 1.0, act: str = "relu", norm: str = "batch") -> nn.Module:
    """MobileNet v1 (depthwise-separable convolutions; `width` multiplies every layer's channels)."""
    return MobileNetV1(in_chans, num_classes, resolve_stem(stem, image_size), width, act, norm)
