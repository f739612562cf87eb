"""ImageNet-layout residual networks on torchvision's implementation: ResNet-18/34/50/101/152 (He et al.,
2016), ResNeXt (Xie et al., 2017), Wide ResNet-50-2 / 101-2 (Zagoruyko & Komodakis, 2016), SE-ResNet
(Hu et al., 2018), and pre-activation ResNets (He et al., 2016, "Identity mappings").

The torchvision-backed models keep torchvision's module names (conv1, bn1, layer1..4, fc), so its weight
files load unchanged. Options on every one of them:
- `stem`: "imagenet" (7x7 stride-2 convolution and max-pool, as published), "small" (3x3 stride-1, no
  max-pool: the usual choice for 28-64 px inputs), or "auto" (imagenet from 96 px up);
- `drop_path`: stochastic depth, the last block's drop probability (linear in depth, Huang et al.);
- `act` / `norm`: any activation / normalization by name in place of ReLU / batch norm;
- `dilation`: replace the stride of the last stages with dilation (bottleneck networks), e.g. (False, True, True).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torchvision.models import resnet as tvr

from ..errors import VisrecError
from ._registry import register_model
from .layers import (
    Classifier,
    DropPath,
    SqueezeExcite,
    activation,
    init_residual,
    norm_layer,
    resolve_stem,
    set_drop_path,
    swap_layers,
)


class BasicBlock(tvr.BasicBlock):
    """torchvision's basic block, with optional squeeze-and-excitation and stochastic depth."""

    def __init__(self, *args, se: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        planes = self.conv2.out_channels
        if se:
            self.se = SqueezeExcite(planes)
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(_merge(self, out, x))


class Bottleneck(tvr.Bottleneck):
    """torchvision's bottleneck block (stride on the 3x3, "ResNet v1.5"), with optional SE and stochastic depth."""

    def __init__(self, *args, se: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if se:
            self.se = SqueezeExcite(self.conv3.out_channels)
        self.drop_path = DropPath(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(_merge(self, out, x))


def _merge(block: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if hasattr(block, "se"):
        out = block.se(out)
    out = block.drop_path(out)
    return out + (block.downsample(x) if block.downsample is not None else x)


class ResNet(Classifier, tvr.ResNet):
    head_path = "fc"
    stage_paths = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, block, layers: list[int], *, in_chans: int, num_classes: int, stem: str,
                 groups: int = 1, width_per_group: int = 64, se: bool = False, drop_path: float = 0.0,
                 act: str = "relu", norm: str = "batch", dilation: tuple[bool, bool, bool] | None = None):
        blk = functools.partial(block, se=se)
        blk.expansion = block.expansion
        if dilation is not None and block is BasicBlock and any(dilation):
            raise VisrecError("dilation needs bottleneck blocks (ResNet-50 and deeper)", "drop the dilation option")
        tvr.ResNet.__init__(self, blk, layers, num_classes=num_classes, groups=groups,
                            width_per_group=width_per_group, replace_stride_with_dilation=list(dilation or [False] * 3),
                            norm_layer=functools.partial(norm_layer, norm))
        if stem == "small":
            self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        elif in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        if stem == "small" or in_chans != 3:
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        set_drop_path(self, drop_path)
        swap_layers(self, act)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


_TV = {  # name: (block, layers, groups, width_per_group)
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 1, 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 1, 64),
    "resnet152": (Bottleneck, [3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], 32, 4),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], 32, 8),
    "resnext101_64x4d": (Bottleneck, [3, 4, 23, 3], 64, 4),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], 1, 128),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], 1, 128),
}


def _make_tv(name: str, se: bool):
    block, layers, groups, width = _TV[name]

    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto",
              drop_path: float = 0.0, act: str = "relu", norm: str = "batch",
              dilation: tuple[bool, bool, bool] | None = None) -> nn.Module:
        return ResNet(block, layers, in_chans=in_chans, num_classes=num_classes, stem=resolve_stem(stem, image_size),
                      groups=groups, width_per_group=width, se=se, drop_path=drop_path, act=act, norm=norm,
                      dilation=dilation)

    kind = "ResNeXt" if groups > 1 else "Wide ResNet" if width > 64 else "ResNet"
    build.__name__ = ("se_" if se else "") + name
    build.__doc__ = (f"{'SE-' if se else ''}{kind} ({'basic' if block is BasicBlock else 'bottleneck'} blocks "
                     f"{'-'.join(map(str, layers))}{f', {groups} groups of width {width}' if groups > 1 else ''})"
                     f"{' with squeeze-and-excitation' if se else ', torchvision layout'}.")
    return build


for _name in _TV:
    register_model(_make_tv(_name, se=False), family="resnext" if "resnext" in _name else
                   "wide_resnet" if "wide" in _name else "resnet")
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d"):
    register_model(_make_tv(_name, se=True), family="se_resnet")


# ---- pre-activation ResNet: BN - ReLU - conv, identity paths kept clean ----


class _PreActBlock(nn.Module):
    """BN-act on the input once; the shortcut takes the pre-activated input when it must change shape; the
    residual branch (`branch`, in the subclass) ends raw, and stochastic depth drops it whole."""

    def _common(self, cin: int, out: int, stride: int, act: str, norm: str) -> None:
        self.bn1 = norm_layer(norm, cin)
        self.shortcut = nn.Conv2d(cin, out, 1, stride, bias=False) if stride != 1 or cin != out else None
        self.act, self.drop_path = _act(act), DropPath(0.0)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        short = self.shortcut(pre) if self.shortcut is not None else x
        return self.drop_path(self.branch(pre)) + short


class PreActBasic(_PreActBlock):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, act: str, norm: str):
        super().__init__()
        self._common(cin, planes, stride, act, norm)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = norm_layer(norm, planes), nn.Conv2d(planes, planes, 3, 1, 1, bias=False)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn2(self.conv1(pre))))


class PreActBottleneck(_PreActBlock):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, act: str, norm: str):
        super().__init__()
        self._common(cin, planes * self.expansion, stride, act, norm)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2, self.conv2 = norm_layer(norm, planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3, self.conv3 = norm_layer(norm, planes), nn.Conv2d(planes, planes * self.expansion, 1, bias=False)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.act(self.bn2(self.conv1(pre))))
        return self.conv3(self.act(self.bn3(out)))


def _act(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else activation(name)  # not in place: the input is the shortcut


def _preact_tail(model: Classifier, cin: int, num_classes: int, act: str, norm: str, drop_path: float) -> None:
    """Norm and activation after the last block (pre-activation blocks leave their sum raw), pooling, head."""
    model.final = nn.Sequential(norm_layer(norm, cin), _act(act))
    model.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    model.head = nn.Linear(cin, num_classes)
    init_residual(model, drop_path)


class PreActResNet(Classifier):
    """Pre-activation ResNet, ImageNet layout (64-128-256-512 base widths), with the same stem choice."""

    stage_paths = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, block, layers: list[int], *, in_chans: int, num_classes: int, stem: str, drop_path: float,
                 act: str, norm: str):
        super().__init__()
        if stem == "small":
            self.stem = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False), norm_layer(norm, 64), _act(act),
                                      nn.MaxPool2d(3, 2, 1))
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if j == 0 and i > 0 else 1, act, norm))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        _preact_tail(self, cin, num_classes, act, norm, drop_path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.final(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


def _make_preact(depth: int, block, layers: list[int]):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], stem: str = "auto",
              drop_path: float = 0.0, act: str = "relu", norm: str = "batch") -> nn.Module:
        return PreActResNet(block, layers, in_chans=in_chans, num_classes=num_classes,
                            stem=resolve_stem(stem, image_size), drop_path=drop_path, act=act, norm=norm)

    build.__name__ = f"preact_resnet{depth}"
    build.__doc__ = f"Pre-activation ResNet-{depth} (BN-ReLU-conv blocks, identity shortcuts kept clean)."
    return build


for _d, _b, _l in ((18, PreActBasic, [2, 2, 2, 2]), (34, PreActBasic, [3, 4, 6, 3]),
                   (50, PreActBottleneck, [3, 4, 6, 3]), (101, PreActBottleneck, [3, 4, 23, 3]),
                   (152, PreActBottleneck, [3, 8, 36, 3])):
    register_model(_make_preact(_d, _b, _l), family="preact_resnet")


# ---- Wide ResNet, CIFAR layout (WRN-depth-width) ----


class WideBlock(_PreActBlock):
    """Pre-activation 3x3-3x3 block with dropout between the convolutions (Zagoruyko & Komodakis, 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float, act: str, norm: str):
        super().__init__()
        self._common(cin, cout, stride, act, norm)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = norm_layer(norm, cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.dropout(self.act(self.bn2(self.conv1(pre)))))


class WideResNet(Classifier):
    stage_paths = ("stages.0", "stages.1", "stages.2")

    def __init__(self, depth: int, width: int, *, in_chans: int, num_classes: int, dropout: float, drop_path: float,
                 act: str, norm: str):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise VisrecError(f"WRN depth {depth} is not of the form 6n+4", "use 10, 16, 22, 28, 40, ...")
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        stages, cin = [], 16
        for i, w in enumerate(widths):
            blocks = [WideBlock(cin if j == 0 else w, w, 2 if j == 0 and i > 0 else 1, dropout, act, norm)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        _preact_tail(self, cin, num_classes, act, norm, drop_path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.stages(self.stem(x)))


@register_model(family="wide_resnet")
def wrn(*, in_chans: int, num_classes: int, image_size: tuple[int, int], depth: int = 28, width: int = 10,
        dropout: float = 0.0, drop_path: float = 0.0, act: str = "relu", norm: str = "batch") -> nn.Module:
    """Wide ResNet WRN-depth-width, CIFAR layout (16k-32k-64k channels); WRN-28-10 by default."""
    return WideResNet(depth, width, in_chans=in_chans, num_classes=num_classes, dropout=dropout,
                      drop_path=drop_path, act=act, norm=norm)


def _make_wrn(depth: int, width: int):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], dropout: float = 0.0,
              drop_path: float = 0.0, act: str = "relu", norm: str = "batch") -> nn.Module:
        return WideResNet(depth, width, in_chans=in_chans, num_classes=num_classes, dropout=dropout,
                          drop_path=drop_path, act=act, norm=norm)

    build.__name__ = f"wrn{depth}_{width}"
    build.__doc__ = f"Wide ResNet WRN-{depth}-{width}, CIFAR layout."
    return build


for _d, _w in ((16, 4), (16, 8), (28, 10), (40, 4)):
    register_model(_make_wrn(_d, _w), family="wide_resnet")

