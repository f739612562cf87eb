"""Batched data augmentation on the training device, deterministic under a seeded generator.

Each augmentation is registered by name and built from a spec string `name` or `name:arg`:

    hflip            mirror left-right with probability 1/2
    vflip            mirror top-bottom with probability 1/2
    crop:PAD         pad by PAD pixels (default 2) with the mean (zero after normalization), then crop
                     back at a random offset: a random translation of up to PAD pixels (alias: translate)
    cutout:SIZE      zero a SIZE x SIZE square (default 8) at a random center, clipped at the border
    mixup:ALPHA      blend pairs of images and their labels, weight ~ Beta(ALPHA, ALPHA) (default 0.2)
    cutmix:ALPHA     paste a box from a paired image, labels mixed by its area (default 1.0)

They run on normalized float batches (N, C, H, W) after the batch is taken from the device tensor. Geometric
targets move with their images (a dict with `boxes` (N, M, 4) xyxy and `box_labels` (N, M), optionally
`instances` (N, H, W) and `semantic` (N, H, W)): a flip mirrors boxes and masks; a crop shifts boxes, clips them to
the image and drops (label -1) those that fall outside; masks shift with the pixels. Mixing two images' targets
is defined for class labels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import VisrecError, unknown_name


@dataclass
class MixedTargets:
    """Labels of a mixed batch: the loss is lam * L(a) + (1 - lam) * L(b)."""

    a: torch.Tensor
    b: torch.Tensor
    lam: float


Targets = torch.Tensor | MixedTargets


class Augmentation:
    name = ""
    default: float | None = None

    def __init__(self, arg: float | None = None):
        self.arg = self.default if arg is None else arg

    def __call__(self, x: torch.Tensor, y: Targets, gen: torch.Generator, rng: np.random.Generator):
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg:g}"


AUGMENTATIONS: dict[str, type[Augmentation]] = {}


def register_augmentation(cls: type[Augmentation]) -> type[Augmentation]:
    AUGMENTATIONS[cls.name] = cls
    return cls


def _rand(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device)


_MASKS = ("instances", "semantic")  # per-pixel targets (N, H, W)


class _Flip(Augmentation):
    dim = 3  # mirror along this axis of (N, C, H, W)

    def __call__(self, x, y, gen, rng):
        flip = _rand(x.shape[0], gen) < 0.5
        out = torch.where(flip.view(-1, 1, 1, 1), x.flip(self.dim), x)
        if isinstance(y, dict):
            y = dict(y)
            size = x.shape[self.dim]
            if "boxes" in y:
                b = y["boxes"]
                lo, hi = (0, 2) if self.dim == 3 else (1, 3)  # the coordinates along the mirrored axis
                mirrored = b.clone()
                mirrored[..., lo], mirrored[..., hi] = size - b[..., hi], size - b[..., lo]
                y["boxes"] = torch.where(flip.view(-1, 1, 1), mirrored, b)
            for k in _MASKS:
                if k in y:
                    y[k] = torch.where(flip.view(-1, 1, 1), y[k].flip(self.dim - 1), y[k])
        return out, y


@register_augmentation
class HFlip(_Flip):
    name, dim = "hflip", 3


@register_augmentation
class VFlip(_Flip):
    name, dim = "vflip", 2


@register_augmentation
class Crop(Augmentation):
    name = "crop"
    default = 2

    def __call__(self, x, y, gen, rng):
        pad = int(self.arg)
        if pad <= 0:
            return x, y
        n, c, h, w = x.shape
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[batch, rows, cols]  # (N, H, W, C)
        if isinstance(y, dict):
            y = _shift_targets(y, (pad - dx).float(), (pad - dy).float(), h, w, batch, rows, cols, pad)
        return out.permute(0, 3, 1, 2), y  # channels_last memory, NCHW shape


def _shift_targets(y: dict, sx: torch.Tensor, sy: torch.Tensor, h: int, w: int, batch, rows, cols, pad: int) -> dict:
    """Targets of images translated by (sx, sy) pixels: boxes shifted and clipped to the image, those left with
    no area dropped (label -1); masks shifted by the same gather as the pixels, zero where the pad came in."""
    y = dict(y)
    if "boxes" in y:
        b = y["boxes"] + torch.stack([sx, sy, sx, sy], 1)[:, None, :]  # (N, M, 4)
        b[..., 0::2] = b[..., 0::2].clamp(0, w)
        b[..., 1::2] = b[..., 1::2].clamp(0, h)
        gone = (b[..., 2] - b[..., 0] <= 0) | (b[..., 3] - b[..., 1] <= 0)
        y["boxes"] = torch.where(gone[..., None], torch.zeros_like(b), b)
        y["box_labels"] = torch.where(gone, torch.full_like(y["box_labels"], -1), y["box_labels"])
    for k in _MASKS:
        if k in y:
            mp = torch.nn.functional.pad(y[k], (pad, pad, pad, pad))  # (N, H+2p, W+2p), zero = no object
            y[k] = mp[batch, rows, cols]
    return y


@register_augmentation
class Translate(Crop):
    name = "translate"


@register_augmentation
class Cutout(Augmentation):
    name = "cutout"
    default = 8

    def __call__(self, x, y, gen, rng):
        n, _, h, w = x.shape
        half = self.arg / 2
        cy = _rand(n, gen) * h
        cx = _rand(n, gen) * w
        ys = torch.arange(h, device=x.device) + 0.5
        xs = torch.arange(w, device=x.device) + 0.5
        inside_y = (ys[None, :] - cy[:, None]).abs() < half  # (N, H)
        inside_x = (xs[None, :] - cx[:, None]).abs() < half  # (N, W)
        keep = ~(inside_y[:, :, None] & inside_x[:, None, :])  # (N, H, W)
        return x * keep[:, None].to(x.dtype), y


def _partner(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen, device=gen.device)


def _labels(y: Targets) -> torch.Tensor:
    if isinstance(y, MixedTargets):
        raise VisrecError("only one of mixup / cutmix can be in data.augment")
    if isinstance(y, dict):
        raise VisrecError("mixup and cutmix mix class labels; they do not apply to boxes or masks",
                          "remove mixup/cutmix from data.augment for this task")
    return y


@register_augmentation
class Mixup(Augmentation):
    name = "mixup"
    default = 0.2

    def __call__(self, x, y, gen, rng):
        lam = float(rng.beta(self.arg, self.arg))
        j = _partner(x.shape[0], gen)
        return lam * x + (1 - lam) * x[j], MixedTargets(_labels(y), _labels(y)[j], lam)


@register_augmentation
class CutMix(Augmentation):
    name = "cutmix"
    default = 1.0

    def __call__(self, x, y, gen, rng):
        n, _, h, w = x.shape
        lam = float(rng.beta(self.arg, self.arg))
        bh, bw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
        j = _partner(n, gen)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[j, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        return x, MixedTargets(_labels(y), _labels(y)[j], lam)


def parse_augmentation(spec: str) -> Augmentation:
    name, _, arg = spec.partition(":")
    name = name.strip()
    if name not in AUGMENTATIONS:
        raise unknown_name("augmentation", name, AUGMENTATIONS, "data.augment")
    if arg:
        try:
            value = float(arg)
        except ValueError:
            raise VisrecError(f"data.augment {spec!r}: {arg!r} is not a number", f"e.g. {name}:2") from None
        if value < 0:
            raise VisrecError(f"data.augment {spec!r}: the argument must be >= 0")
        return AUGMENTATIONS[name](value)
    return AUGMENTATIONS[name]()


class Pipeline:
    """Augmentations applied in order; `seed` fixes every random draw."""

    def __init__(self, specs: list[str], device: torch.device | str = "cpu", seed: int = 0):
        self.steps = [parse_augmentation(s) for s in specs]
        mixers = [s for s in self.steps if isinstance(s, Mixup | CutMix)]
        if len(mixers) > 1:
            raise VisrecError("only one of mixup / cutmix can be in data.augment")
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Targets]:
        t: Targets = y
        for step in self.steps:
            x, t = step(x, t, self.gen, self.rng)
        return x, t

    def get_state(self) -> dict:
        return {"gen": self.gen.get_state(), "rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.rng.bit_generator.state = state["rng"]

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(map(repr, self.steps))}])"

    def __bool__(self) -> bool:
        return bool(self.steps)


