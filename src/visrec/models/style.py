"""Images from networks' features: Gram matrices, the perceptual losses of style transfer, loss networks, and the
image transformation network of fast style transfer.

Loss networks take float images with pixels in 0..1, (N, C, H, W), RGB or gray, do the preprocessing their weights
were trained with, and return the feature maps of the layers asked for, by name (`net(x, ["relu1_1", ...])`).

    vgg16 / vgg19     torchvision's VGG with the user's weights file (ImageNet-trained weights cannot be fetched
                      here); preprocessing `torchvision` (RGB, 0..1, ImageNet mean and std) or `caffe` (BGR,
                      0..255, mean only), the two conventions VGG weights files come in
    random_vgg        VGG-19's shape with seeded random filters, each layer rescaled so its channels have zero mean
                      and unit variance on calibration images (He, Wang and Hopcroft 2016): every layer then
                      weighs the same in a sum of losses. Good for textures and coarse content; it knows no objects
    random_multiscale one layer of random filters of several sizes (Ustyuzhaninov et al. 2016): Gram matrices of
                      it synthesize textures nearly as well as VGG's, and cost one layer
    ModelLossNet      the stages of any visrec classification model (`stage1`, `stage2`, ...), with its run's
                      normalization

The losses are normalized so their weights do not depend on feature scale: a style layer's loss is
||G(x) - G(s)||² / ||G(s)||² and a content layer's ||F(x) - F(c)||² / ||F(c)||², each averaged over its layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..errors import VisrecError
from ._registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
LUMA = (0.299, 0.587, 0.114)


def gram(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, C): the channels' inner products averaged over positions, F Fᵀ / (H W)."""
    n, c, h, w = features.shape
    f = features.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (h * w)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of vertical and horizontal neighbours, per image (N,)."""
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(1)
    return dy + dx


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images of 1 or 3 channels as `channels`: gray repeated to RGB, RGB to luminance (ITU-R 601)."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)
    w = x.new_tensor(LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


class LossNet(nn.Module):
    """A feature extractor for synthesis: `forward(x01, names)` -> {name: feature map}. Subclasses set `layers`
    (every name, input side first), `channels`, `downsampling` (name -> stride), the default layers and a
    one-line `description`."""

    name = "lossnet"
    channels = 3
    description = ""
    content_layers: tuple[str, ...] = ()
    style_layers: tuple[str, ...] = ()
    dream_layer = ""

    def __init__(self) -> None:
        super().__init__()
        self.layers: tuple[str, ...] = ()
        self.downsampling: dict[str, int] = {}

    def check_layers(self, names: Sequence[str], option: str = "--layer") -> None:
        bad = [n for n in names if n not in self.layers]
        if bad:
            raise VisrecError(f"{option} {', '.join(bad)}: not a layer of the loss network {self.name}",
                              f"its layers are: {', '.join(self.layers)}")

    def check_size(self, hw: tuple[int, int], names: Sequence[str], what: str = "the image") -> None:
        """Refuse images too small for the deepest layer used: its feature map must be at least 2x2."""
        deepest = max(names, key=lambda n: self.downsampling.get(n, 1))
        need = 2 * self.downsampling.get(deepest, 1)
        if min(hw) < need:
            raise VisrecError(f"{what} is {hw[1]}x{hw[0]} pixels, too small for layer {deepest} of {self.name} "
                              f"(it downsamples {self.downsampling[deepest]}x, so it needs at least {need} pixels "
                              "on each side)", f"use --size {max(need, 2 * min(hw))} or more, or shallower layers")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return to_channels(x, self.channels)

    def forward(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return self.description


def _named_vgg(body: nn.Sequential) -> tuple[list[str], dict[str, int]]:
    """Course names of VGG's layers (conv1_1, relu1_1, ..., pool1, ...) and each one's stride."""
    names, stride, block, i, down = [], {}, 1, 0, 1
    for m in body:
        if isinstance(m, nn.Conv2d):
            i += 1
            names.append(f"conv{block}_{i}")
        elif isinstance(m, nn.ReLU):
            names.append(f"relu{block}_{i}")
        else:
            down *= 2
            names.append(f"pool{block}")
            block, i = block + 1, 0
        stride[names[-1]] = down
    return names, stride


VGG_CFGS = {"vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
            "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                      512, 512, 512, 512, "M"]}


def _vgg_body(arch: str, width: float = 1.0, in_chans: int = 3) -> nn.Sequential:
    """torchvision's VGG `features` layout (same indices, so its state_dict keys load), ReLUs not in place (a
    content layer may be a convolution's output)."""
    layers: list[nn.Module] = []
    c = in_chans
    for v in VGG_CFGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out = max(4, int(round(v * width)))
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            c = out
    return nn.Sequential(*layers)


class SequentialLossNet(LossNet):
    """A plain stack (VGG): runs only as deep as the deepest layer asked for."""

    def __init__(self, body: nn.Sequential, names: list[str], stride: dict[str, int]):
        super().__init__()
        self.body = body
        self.layers = tuple(names)
        self.downsampling = stride
        self._index = {n: i for i, n in enumerate(names)}

    def forward(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        want = set(names)
        last = max(self._index[n] for n in want)
        out = {}
        h = self.preprocess(x)
        for i, m in enumerate(self.body[: last + 1]):
            h = m(h)
            if self.layers[i] in want:
                out[self.layers[i]] = h
        return out

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        """Rescale every convolution so its channels have zero mean and unit variance on `images` (0..1)."""
        h = self.preprocess(images)
        for m in self.body:
            h = m(h)
            if isinstance(m, nn.Conv2d):
                mean = h.mean((0, 2, 3))
                std = h.std((0, 2, 3)).clamp_min(1e-6)
                m.weight.div_(std.view(-1, 1, 1, 1))
                m.bias.sub_(mean).div_(std)
                h = (h - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class VGGLossNet(SequentialLossNet):
    """VGG-16/19 with a weights file, in the preprocessing convention of those weights."""

    def __init__(self, arch: str, state: dict[str, torch.Tensor], *, convention: str = "torchvision",
                 source: str = ""):
        if arch not in VGG_CFGS:
            raise VisrecError(f"loss network {arch!r} is not a VGG", "use vgg16 or vgg19")
        if convention not in ("torchvision", "caffe"):
            raise VisrecError(f"VGG preprocessing {convention!r} is not known", "use torchvision or caffe")
        body = _vgg_body(arch)
        names, stride = _named_vgg(body)
        super().__init__(body, names, stride)
        self.name, self.convention = arch, convention
        self.description = (f"{arch} from {source or 'given weights'}, {convention} preprocessing "
                            + ("(RGB, 0..1, ImageNet mean/std)" if convention == "torchvision"
                               else "(BGR, 0..255, mean subtracted)"))
        _load_vgg(self.body, state, arch, source)
        for p in self.parameters():
            p.requires_grad_(False)
        if arch == "vgg16":  # Johnson et al. 2016
            self.content_layers, self.style_layers = ("relu2_2",), ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
        else:  # Gatys et al. 2016
            self.content_layers = ("relu4_2",)
            self.style_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
        self.dream_layer = "relu4_2"
        if convention == "torchvision":
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        else:
            self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1))
            self.register_buffer("std", torch.ones(1, 3, 1, 1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = to_channels(x, 3)
        if self.convention == "caffe":
            x = x.flip(1) * 255.0
        return (x - self.mean) / self.std


def _load_vgg(body: nn.Sequential, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Load torchvision VGG weights (`features.N.weight` of a whole model, or `N.weight` of its features) into
    `body`; a mismatch names the keys and shapes at fault and, where it is one, the other VGG."""
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or dict(state)
    own = body.state_dict()
    convs_file = len({k.split(".")[0] for k in feats if k.endswith(".weight") and feats[k].dim() == 4})
    convs_arch = sum(1 for v in VGG_CFGS[arch] if v != "M")
    missing = [k for k in own if k not in feats]
    wrong = [f"{k}: file {tuple(feats[k].shape)}, {arch} {tuple(own[k].shape)}" for k in own
             if k in feats and feats[k].shape != own[k].shape]
    if missing or wrong or convs_file != convs_arch:
        other = {13: "vgg16", 16: "vgg19"}.get(convs_file)
        hint = (f"the file has {convs_file} convolutions: it looks like {other} weights; use --net {other}:PATH"
                if other and other != arch else
                "give a torchvision VGG-16/19 state_dict (e.g. vgg19-dcbb9e9d.pth) with the matching --net vgg16: "
                "or vgg19:")
        detail = "; ".join(([f"missing {', '.join(missing[:4])}"] if missing else []) + wrong[:3])
        raise VisrecError(f"{source or 'the weights'} do not match {arch} ({convs_file} convolutions in the file, "
                          f"{convs_arch} in {arch}{'; ' + detail if detail else ''})", hint)
    body.load_state_dict({k: feats[k].float() for k in own})


class RandomVGG(SequentialLossNet):
    """VGG-19's shape with seeded random (He-normal) filters; `calibrate` sets each layer's scale."""

    name = "random_vgg"

    def __init__(self, *, seed: int = 0, width: float = 1.0, depth: int = 4):
        body = _vgg_body("vgg19", width)
        names, stride = _named_vgg(body)
        keep = max(i for i, n in enumerate(names) if n == f"relu{depth}_1")  # deeper random layers add noise
        body = nn.Sequential(*list(body)[: keep + 1])
        g = torch.Generator().manual_seed(seed)
        for m in body:
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * 9
                m.weight.data = torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in)
                m.bias.data.zero_()
        super().__init__(body, names[: keep + 1], {n: stride[n] for n in names[: keep + 1]})
        for p in self.parameters():
            p.requires_grad_(False)
        self.description = (f"VGG-19 layout to relu{depth}_1, random filters (seed {seed}, width {width:g}), "
                            "each layer normalized on the calibration images")
        self.content_layers = ("relu3_1",)
        self.style_layers = tuple(f"relu{b}_1" for b in range(1, depth + 1))
        self.dream_layer = "relu3_1"


class RandomMultiScale(LossNet):
    """One layer of zero-mean random filters of several sizes, ReLU, reflection padding (Ustyuzhaninov et al.
    2016); layer `kN` is the N x N filters' maps."""

    name = "random_multiscale"

    def __init__(self, *, seed: int = 0, sizes: Sequence[int] = (3, 5, 7, 11, 15), filters: int = 64,
                 in_chans: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleDict()
        for k in sizes:
            conv = nn.Conv2d(in_chans, filters, k)
            w = torch.randn(conv.weight.shape, generator=g)
            w = w - w.mean((1, 2, 3), keepdim=True)
            conv.weight.data = w / math.sqrt(in_chans * k * k)
            conv.bias.data.zero_()
            self.convs[f"k{k}"] = conv
        for p in self.parameters():
            p.requires_grad_(False)
        self.layers = tuple(self.convs)
        self.downsampling = {n: 1 for n in self.layers}
        self.description = (f"one layer of random filters, sizes {', '.join(map(str, sizes))}, {filters} each "
                            f"(seed {seed}), normalized on the calibration images")
        self.content_layers = (self.layers[0],)
        self.style_layers = self.layers
        self.dream_layer = self.layers[-1]

    def _conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        conv = self.convs[name]
        p = conv.kernel_size[0] // 2
        pad = "reflect" if min(x.shape[-2:]) > p else "replicate"
        return conv(F.pad(x, (p, p, p, p), mode=pad))

    def forward(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        x = self.preprocess(x)
        return {n: F.relu(self._conv(n, x)) for n in names}

    def check_size(self, hw: tuple[int, int], names: Sequence[str], what: str = "the image") -> None:
        need = max(self.convs[n].kernel_size[0] for n in names) // 2 + 1
        if min(hw) < need:
            raise VisrecError(f"{what} is {hw[1]}x{hw[0]} pixels, smaller than the {need - 1}-pixel margin of the "
                              f"largest filters of {self.name}", f"use --size {2 * need} or more")

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        x = self.preprocess(images)
        for name, conv in self.convs.items():
            h = self._conv(name, x)
            mean, std = h.mean((0, 2, 3)), h.std((0, 2, 3)).clamp_min(1e-6)
            conv.weight.div_(std.view(-1, 1, 1, 1))
            conv.bias.sub_(mean).div_(std)


class ModelLossNet(LossNet):
    """The stages of a visrec model (`feature_maps`), named stage1..stageN (input side first) and by their paths;
    `normalize` maps 0..255 pixels to the model's input (its run's normalizer)."""

    def __init__(self, model: nn.Module, normalize, channels: int, *, source: str = "", probe_size: int = 64):
        super().__init__()
        from .layers import feature_maps

        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.normalize = normalize
        self.channels = channels
        self.name = source or type(model).__name__
        with torch.no_grad():
            probe = feature_maps(self.model, torch.zeros(1, channels, probe_size, probe_size))
        self.paths = list(probe)
        if any(m.dim() != 4 for m in probe.values()):
            raise VisrecError(f"{self.name} has no spatial feature maps (a linear or MLP model)",
                              "give a convolutional classification run, or use --net random_vgg")
        self.alias = {f"stage{i + 1}": p for i, p in enumerate(self.paths)}
        self.layers = tuple(self.alias) + tuple(p for p in self.paths if p not in self.alias)
        self.downsampling = {}
        for a, p in self.alias.items():
            self.downsampling[a] = self.downsampling[p] = max(1, probe_size // probe[p].shape[-1])
        n = len(self.paths)
        self.content_layers = (f"stage{max(1, n // 2)}",)
        self.style_layers = tuple(self.alias)
        self.dream_layer = f"stage{n}"
        self.description = f"the stages of {self.name} ({', '.join(f'{a}={p}' for a, p in self.alias.items())})"

    def forward(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        from .layers import feature_maps

        maps = feature_maps(self.model, self.normalize(to_channels(x, self.channels) * 255.0))
        return {n: maps[self.alias.get(n, n)] for n in names}


@dataclass
class StyleLosses:
    """The parts of a perceptual loss for a batch, each (N,) per image; `total` is the weighted sum."""

    total: torch.Tensor
    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).mean()) for k in ("total", "content", "style", "tv")}


class PerceptualLoss(nn.Module):
    """Content, style and total-variation losses through a loss network (Gatys et al. 2016; Johnson et al. 2016).

    `style` (1, C, H, W) 0..1 fixes the style targets (Gram matrices; of several images, their mean); content
    targets are given per call as the content images (0..1) or their precomputed features."""

    def __init__(self, net: LossNet, style: torch.Tensor | None, *, content_layers: Sequence[str] | None = None,
                 style_layers: Sequence[str] | None = None, content_weight: float = 1.0, style_weight: float = 5.0,
                 tv_weight: float = 1.0):
        super().__init__()
        self.net = net
        self.content_layers = tuple(content_layers or net.content_layers)
        self.style_layers = tuple(style_layers or net.style_layers)
        net.check_layers(self.content_layers, "content layer")
        net.check_layers(self.style_layers, "style layer")
        self.weights = {"content": content_weight, "style": style_weight, "tv": tv_weight}
        self.grams: dict[str, torch.Tensor] = {}
        if style is not None:
            net.check_size(tuple(style.shape[-2:]), self.style_layers, "the style image")
            with torch.no_grad():
                feats = net(style, self.style_layers)
            self.grams = {n: gram(f).mean(0, keepdim=True) for n, f in feats.items()}

    @torch.no_grad()
    def content_targets(self, content: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(content, self.content_layers) if self.weights["content"] else {}

    def forward(self, x: torch.Tensor, content: dict[str, torch.Tensor] | torch.Tensor | None = None) -> StyleLosses:
        names = list(dict.fromkeys((self.content_layers if content is not None else ()) +
                                   (self.style_layers if self.grams else ())))
        feats = self.net(x, names) if names else {}
        zero = x.new_zeros(len(x))
        c_loss = s_loss = zero
        if content is not None and self.weights["content"]:
            target = content if isinstance(content, dict) else self.content_targets(content)
            c_loss = sum(((feats[n] - target[n]).flatten(1).pow(2).sum(1) /
                          target[n].flatten(1).pow(2).sum(1).clamp_min(1e-12)) for n in self.content_layers
                         ) / len(self.content_layers)
        if self.grams:
            s_loss = sum(((gram(feats[n]) - self.grams[n]).flatten(1).pow(2).sum(1) /
                          self.grams[n].pow(2).sum().clamp_min(1e-12)) for n in self.style_layers
                         ) / len(self.style_layers)
        tv = total_variation(x) if self.weights["tv"] else zero
        w = self.weights
        return StyleLosses(w["content"] * c_loss + w["style"] * s_loss + w["tv"] * tv, c_loss, s_loss, tv)


# ------------------------------------------------------------------ the transformation network (Johnson et al.)


class _ConvIN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True):
        layers: list[nn.Module] = [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride),
                                   nn.InstanceNorm2d(cout, affine=True)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(_ConvIN(c, c, 3), _ConvIN(c, c, 3, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Up(nn.Sequential):
    """Nearest-neighbour upsampling, then a convolution: no checkerboard of transposed convolutions."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), _ConvIN(cin, cout, 3))


class TransformNet(nn.Module):
    """Image in (0..255), stylized image out (0..255, same size): a 9x9 convolution, two stride-2 convolutions,
    `blocks` residual blocks, two upsample+convolution stages and a 9x9 output convolution; instance norm,
    reflection padding. Any size: the input is reflection-padded to a multiple of 4 and cropped back."""

    stylizer = True

    def __init__(self, in_chans: int = 3, width: int = 32, blocks: int = 5):
        super().__init__()
        w = width
        self.down = nn.Sequential(_ConvIN(in_chans, w, 9), _ConvIN(w, 2 * w, 3, 2), _ConvIN(2 * w, 4 * w, 3, 2))
        self.res = nn.Sequential(*[_Residual(4 * w) for _ in range(blocks)])
        self.up = nn.Sequential(_Up(4 * w, 2 * w), _Up(2 * w, w))
        self.out = nn.Sequential(nn.ReflectionPad2d(4), nn.Conv2d(w, in_chans, 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        y = x / 127.5 - 1.0
        if ph or pw:
            y = F.pad(y, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        y = self.out(self.up(self.res(self.down(y))))
        return 255.0 * torch.sigmoid(y[..., :h, :w])


@register_model(family="style")
def transformnet(in_chans: int = 3, num_classes: int = 3, image_size=None, *, width: int = 32,
                 blocks: int = 5) -> nn.Module:
    """Fast style transfer's image transformation network (Johnson et al. 2016): residual, instance norm."""
    if num_classes != in_chans:
        raise VisrecError(f"transformnet outputs images of its input's {in_chans} channels, not {num_classes}",
                          "train it with --task style")
    return TransformNet(in_chans, width, blocks)


# ------------------------------------------------------------------ colour: luminance-only transfer


def rgb_to_yiq(x: torch.Tensor) -> torch.Tensor:
    m = x.new_tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
    return torch.einsum("ij,njhw->nihw", m, x)


def yiq_to_rgb(x: torch.Tensor) -> torch.Tensor:
    m = x.new_tensor([[1.0, 0.9563, 0.6210], [1.0, -0.2721, -0.6474], [1.0, -1.1070, 1.7046]])
    return torch.einsum("ij,njhw->nihw", m, x)
