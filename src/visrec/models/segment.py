"""Dense prediction: networks that output one score map per class, (batch, classes, H, W), at the input's size.

`unet` (Ronneberger et al., 2015): an encoder of conv-BN-ReLU pairs and 2x2 max-pools, a decoder that
upsamples, concatenates the encoder's map of the same resolution (the skip connection) and convolves, then a
1x1 convolution to the classes. `fcn` is the same encoder-decoder without the skips, the course's "fully
convolutional network with downsampling and upsampling".

The decoder's upsampling is an option (`up`), with the lecture's choices: `nearest` (copy each value to a 2x2
block), `bed_of_nails` (the value in the block's top-left corner, zeros elsewhere), `max_unpool` (back to the
position the matching max-pool took it from: the pooling switches), `transpose` (a learned 2x2 transposed
convolution with stride 2) and `bilinear` (bilinear interpolation then a 3x3 convolution, which avoids the
checkerboard artifacts of transposed convolutions).

An input whose sides are not multiples of 2^depth is padded (reflecting) to the next multiple and the output
cropped back, so any size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VisrecError
from ._registry import register_model

UPSAMPLING = ("nearest", "bed_of_nails", "max_unpool", "transpose", "bilinear")


def _pair(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Up(nn.Module):
    """Double the resolution of (B, cin, H, W) by one of UPSAMPLING, to cout channels; `indices` are the
    switches of the max-pool that halved this resolution (whose map had cout channels)."""

    def __init__(self, kind: str, cin: int, cout: int):
        super().__init__()
        self.kind = kind
        if kind == "transpose":
            self.conv = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        elif kind == "bilinear":
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        else:  # the channel change is a 1x1 convolution: before unpooling (its switches have cout channels)
            self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "transpose":
            return self.conv(x)
        if self.kind == "bilinear":
            return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        x = self.conv(x)
        if self.kind == "nearest":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.kind == "bed_of_nails":
            out = x.new_zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] * 2)
            out[..., ::2, ::2] = x
            return out
        return F.max_unpool2d(x, indices, 2)


class EncoderDecoder(nn.Module):
    """U-Net (`skips=True`) or a plain fully convolutional encoder-decoder (`skips=False`)."""

    dense_output = True  # (batch, classes, H, W): the registry and the tasks check for this

    def __init__(self, in_chans: int, num_classes: int, widths: list[int], up: str, skips: bool):
        super().__init__()
        if up not in UPSAMPLING:
            raise VisrecError(f"up={up!r} is not an upsampling of this network", f"use one of {', '.join(UPSAMPLING)}")
        if len(widths) < 2:
            raise VisrecError(f"widths={widths} needs at least two levels", "for example widths=[16,32,64]")
        self.depth, self.skips, self.up_kind = len(widths) - 1, skips, up
        self.down = nn.ModuleList()
        cin = in_chans
        for w in widths:
            self.down.append(_pair(cin, w))
            cin = w
        self.ups, self.merge = nn.ModuleList(), nn.ModuleList()
        for w_skip, w in zip(widths[-2::-1], widths[:0:-1], strict=True):  # from the bottom up
            self.ups.append(_Up(up, w, w_skip))
            self.merge.append(_pair(w_skip * (2 if skips else 1), w_skip))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.stage_paths = tuple(f"down.{i}" for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2 ** self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:  # pad to a multiple of the network's stride, crop back below
            mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        feats, switches = [], []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                feats.append(x)
                x, idx = F.max_pool2d(x, 2, return_indices=True)
                switches.append(idx)
        for up, merge in zip(self.ups, self.merge, strict=True):
            skip, idx = feats.pop(), switches.pop()
            x = up(x, idx)
            x = merge(torch.cat([x, skip], 1) if self.skips else x)
        return self.head(x)[..., :h, :w]


@register_model(family="segmentation")
def unet(in_chans: int, num_classes: int, image_size: tuple[int, int], *, widths: list[int] | None = None,
         up: str = "transpose") -> nn.Module:
    """U-Net: encoder-decoder with skip connections; per-pixel class scores (up: nearest, bed_of_nails,
    max_unpool, transpose, bilinear)."""
    return EncoderDecoder(in_chans, num_classes, list(widths or [16, 32, 64]), up, skips=True)


@register_model(family="segmentation")
def fcn(in_chans: int, num_classes: int, image_size: tuple[int, int], *, widths: list[int] | None = None,
        up: str = "transpose") -> nn.Module:
    """Fully convolutional encoder-decoder without skips (the lecture's downsample-then-upsample network)."""
    return EncoderDecoder(in_chans, num_classes, list(widths or [16, 32, 64]), up, skips=False)


class FullResolution(nn.Module):
    """The lecture's second idea: a stack of 3x3 convolutions that never downsamples, so every layer works at the
    input's full resolution (expensive, and with a small receptive field: 2 * depth + 1 pixels)."""

    dense_output = True

    def __init__(self, in_chans: int, num_classes: int, width: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SlidingWindow(nn.Module):
    """The lecture's first idea: crop a `window` x `window` patch around every pixel and classify the center pixel
    with a small CNN, one patch at a time (here in chunks of `chunk` patches). The patches overlap almost entirely,
    so the same features are computed window^2 times over: the cost the fully convolutional network removes."""

    dense_output = True

    def __init__(self, in_chans: int, num_classes: int, window: int, width: int, chunk: int = 8192):
        super().__init__()
        if window < 3 or window % 2 == 0:
            raise VisrecError(f"window={window} must be odd and at least 3", "for example window=15")
        self.window, self.chunk = window, chunk
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        r = self.window // 2
        patches = F.unfold(F.pad(x, (r, r, r, r), mode="replicate" if min(h, w) <= r else "reflect"),
                           self.window)  # (B, C * k * k, H * W)
        patches = patches.transpose(1, 2).reshape(-1, c, self.window, self.window)
        scores = torch.cat([self.net(p) for p in patches.split(self.chunk)])
        return scores.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


@register_model(family="segmentation")
def fullres(in_chans: int, num_classes: int, image_size: tuple[int, int], *, width: int = 32,
            depth: int = 6) -> nn.Module:
    """Convolutions at full resolution, no downsampling: per-pixel class scores (the lecture's second idea)."""
    return FullResolution(in_chans, num_classes, width, depth)


@register_model(family="segmentation")
def sliding_window(in_chans: int, num_classes: int, image_size: tuple[int, int], *, window: int = 15,
                   width: int = 16) -> nn.Module:
    """A CNN classifying the center pixel of a window around every pixel (the lecture's first idea)."""
    return SlidingWindow(in_chans, num_classes, window, width)
