"""The plain deep ConvNets of the course's ImageNet history: AlexNet (Krizhevsky et al., 2012), ZFNet (Zeiler &
Fergus, 2013), VGG-11/13/16/19 with and without batch norm (Simonyan & Zisserman, 2014), and Network in
Network (Lin et al., 2013).

AlexNet and VGG are torchvision's classes (module names unchanged, so its weight files load). For small
inputs (`stem="small"`, chosen automatically under 96 px) the first convolution becomes 3x3 stride 1 and the
early max-pools that would shrink the map to nothing are replaced by identities (the module indices stay
where torchvision has them); `head="gap"` (the default with the small stem) replaces the 4096-wide fully
connected layers with global average pooling and one linear layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import VGG as _TvVGG
from torchvision.models import AlexNet as _TvAlexNet
from torchvision.models import vgg as tvv

from ..errors import VisrecError
from ._registry import register_model
from .layers import Classifier, activation, resolve_stem, swap_layers

HEADS = ("auto", "fc", "gap")


def _head_kind(head: str, stem: str) -> str:
    if head not in HEADS:
        raise VisrecError(f"head {head!r} is not valid", f"use one of {', '.join(HEADS)}")
    return ("fc" if stem == "imagenet" else "gap") if head == "auto" else head


class _FcHeadNet(Classifier):
    """features -> avgpool -> flatten -> classifier, torchvision's layout; the last classifier layer is the head."""

    def _setup_head(self, kind: str, channels: int, num_classes: int) -> None:
        if kind == "gap":
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(channels, num_classes))
        self.head_path = f"classifier.{len(self.classifier) - 1}"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        x = self.classifier[:-1](x)
        return x if pre_logits else self.classifier[-1](x)

    def _small_pools(self, keep_last: int) -> None:
        """Make the max-pools safe for tiny maps: padded, and all but the last `keep_last` are identities."""
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        for n, i in enumerate(pools):
            old = self.features[i]
            keep = n >= len(pools) - keep_last
            k = old.kernel_size
            pad = ((k if isinstance(k, int) else k[0]) - 1) // 2
            self.features[i] = nn.MaxPool2d(k, old.stride, padding=pad, ceil_mode=True) if keep else nn.Identity()


class AlexNet(_FcHeadNet, _TvAlexNet):
    stage_paths = ("features.2", "features.5", "features.12")

    def __init__(self, in_chans: int, num_classes: int, stem: str, head: str, dropout: float, act: str):
        _TvAlexNet.__init__(self, num_classes=num_classes, dropout=dropout)
        if stem == "small":
            self.features[0] = nn.Conv2d(in_chans, 64, 3, 1, 1)
            self._small_pools(keep_last=3)
        elif in_chans != 3:
            self.features[0] = nn.Conv2d(in_chans, 64, 11, 4, 2)
        self._setup_head(_head_kind(head, stem), 256, num_classes)
        swap_layers(self, act)


class ZFNet(_FcHeadNet):
    """ZFNet: AlexNet with a 7x7 stride-2 first layer and a stride-2 second, the widths of the paper
    (96-256-384-384-256), and local response normalization after the first two layers."""

    stage_paths = ("features.3", "features.7", "features.14")

    def __init__(self, in_chans: int, num_classes: int, stem: str, head: str, dropout: float, act: str):
        super().__init__()
        small = stem == "small"
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 96, 3 if small else 7, 1 if small else 2, 1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1), nn.LocalResponseNorm(5),
            nn.Conv2d(96, 256, 5, 1 if small else 2, 2 if small else 0), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1), nn.LocalResponseNorm(5),
            nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        if small:
            self._small_pools(keep_last=3)
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes),
        )
        self._setup_head(_head_kind(head, stem), 256, num_classes)
        swap_layers(self, act)


@register_model(family="alexnet")
def alexnet(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto", head: str = "auto",
            dropout: float = 0.5, act: str = "relu") -> nn.Module:
    """AlexNet (torchvision's single-tower version: 64-192-384-256-256 convs, two 4096-wide FC layers)."""
    stem = resolve_stem(stem, image_size)
    return AlexNet(in_chans, num_classes, stem, head, dropout, act)


@register_model(family="alexnet")
def zfnet(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto", head: str = "auto",
          dropout: float = 0.5, act: str = "relu") -> nn.Module:
    """ZFNet: AlexNet with 7x7/2 first convolution, as visualized and tuned by Zeiler & Fergus."""
    return ZFNet(in_chans, num_classes, resolve_stem(stem, image_size), head, dropout, act)


class VGG(_FcHeadNet, _TvVGG):
    def __init__(self, cfg: str, batch_norm: bool, in_chans: int, num_classes: int, stem: str, head: str,
                 dropout: float, act: str, norm: str):
        _TvVGG.__init__(self, tvv.make_layers(tvv.cfgs[cfg], batch_norm=batch_norm), num_classes=num_classes,
                        dropout=dropout)
        if in_chans != 3:
            self.features[0] = nn.Conv2d(in_chans, 64, 3, padding=1)
        if stem == "small":
            self._small_pools(keep_last=3)
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d | nn.Identity)]
        self.stage_paths = tuple(f"features.{i}" for i in pools)
        self._setup_head(_head_kind(head, stem), 512, num_classes)
        swap_layers(self, act, norm if batch_norm else "batch")


def _make_vgg(depth: int, cfg: str, bn: bool):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto",
              head: str = "auto", dropout: float = 0.5, act: str = "relu", norm: str = "batch") -> nn.Module:
        return VGG(cfg, bn, in_chans, num_classes, resolve_stem(stem, image_size), head, dropout, act, norm)

    build.__name__ = f"vgg{depth}{'_bn' if bn else ''}"
    build.__doc__ = f"VGG-{depth} ({'with' if bn else 'without'} batch norm): 3x3 convolutions, five stages."
    return build


for _depth, _cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E")):
    for _bn in (False, True):
        register_model(_make_vgg(_depth, _cfg, _bn), family="vgg")


class NiN(Classifier):
    """Network in Network, the paper's CIFAR-10 model: three mlpconv blocks (a spatial convolution followed by
    two 1x1 convolutions), max/avg pooling with dropout between them, and global average pooling.

    The paper's last 1x1 convolution maps to the classes before the global average; averaging and a 1x1
    convolution commute, so here it is the linear `head` after the pooling: the same function, with the
    common classifier surface. `stem="imagenet"` puts an 11x11 stride-4 first convolution in front for large
    inputs."""

    stage_paths = ("block1", "block2", "block3")

    def __init__(self, in_chans: int, num_classes: int, stem: str, dropout: float, act: str):
        super().__init__()

        def mlpconv(cin: int, widths: tuple[int, int, int], k: int, stride: int = 1) -> nn.Sequential:
            a, b, c = widths
            return nn.Sequential(nn.Conv2d(cin, a, k, stride, k // 2 if stride == 1 else 0), activation(act, a),
                                 nn.Conv2d(a, b, 1), activation(act, b), nn.Conv2d(b, c, 1), activation(act, c))

        first = mlpconv(in_chans, (96, 96, 96), 11, 4) if stem == "imagenet" else mlpconv(in_chans, (192, 160, 96), 5)
        self.block1 = nn.Sequential(first, nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Dropout(dropout))
        self.block2 = nn.Sequential(mlpconv(96, (192, 192, 192), 5), nn.AvgPool2d(3, 2, 1, ceil_mode=True),
                                    nn.Dropout(dropout))
        self.block3 = mlpconv(192, (192, 192, 192), 3)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(192, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.block2(self.block1(x)))


@register_model(family="nin")
def nin(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto", dropout: float = 0.5,
        act: str = "relu") -> nn.Module:
    """Network in Network (mlpconv blocks, global average pooling instead of FC layers)."""
    return NiN(in_chans, num_classes, resolve_stem(stem, image_size), dropout, act)
