"""Batched data augmentation on the training device, deterministic under a seeded generator.

Each augmentation is registered by name and built from a spec string `name` or `name:arg`:

    hflip            mirror left-right with probability 1/2
    altflip          mirror left-right in alternate epochs, from a random half in the first (see AltFlip)
    vflip            mirror top-bottom with probability 1/2
    crop:PAD         pad by PAD pixels (default 2) with the mean (zero after normalization), then crop
                     back at a random offset: a random translation of up to PAD pixels (alias: translate)
    scale:LO,HI      zoom the batch by a factor uniform in [LO, HI] (default 0.5,1.5), cut or padded with the mean back
                     to its size at a random place: scale jitter (multi-scale training), boxes and masks with it
    cutout:SIZE      zero a SIZE x SIZE square (default 8) at a random center, clipped at the border
    erase:P          random erasing (Zhong et al., 2020): with probability P (default 0.5) an image gets a
                     rectangle of 2-40% of its area, aspect ratio log-uniform in [0.3, 1/0.3], at a random place
                     where it fits, filled with N(0, 1) noise in normalized units (random pixel values)
    mixup:ALPHA      blend pairs of images and their labels, weight ~ Beta(ALPHA, ALPHA) (default 0.2)
    cutmix:ALPHA     paste a box from a paired image, labels mixed by its area (default 1.0)
    color_jitter:B,C,S,H   per image, in this order: brightness x U(1-B, 1+B), contrast around the image's mean
                     gray x U(1-C, 1+C), saturation around each pixel's gray x U(1-S, 1+S), hue rotated by
                     U(-H, H) of a turn (H <= 0.5; a rotation about the gray axis in YIQ space); pixels stay in
                     0..255. Default 0.4,0.4,0.4,0. Saturation and hue do nothing to grayscale images.
    pca_color:STD    AlexNet's "fancy PCA": add sum_i a_i * lambda_i * p_i to every pixel of an image, with
                     (lambda_i, p_i) the eigenvalues and eigenvectors of the RGB covariance fitted on the training
                     images and a_i ~ N(0, STD^2) per image (default 0.1); color images only

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
    pixels = False  # works on pixel values: bound to the normalization (and the training images) by `bind`
    by_batches = False  # applied by the batch iterator, which knows each image's index and the epoch (altflip)

    def __init__(self, arg: float | None = None):
        self.arg = self.default if arg is None else arg

    def bind(self, mean: torch.Tensor, std: torch.Tensor, images: torch.Tensor | None) -> None:
        """Pixel-space augmentations: the normalizer's mean and std (0..255 units, broadcastable to (C, H, W)) and
        the uint8 training images (N, C, H, W), for those fitted from data."""

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


_MASKS = ("instances", "overlaps", "semantic")  # per-pixel targets (N, H, W)


def mirror(x: torch.Tensor, y: Targets, flip: torch.Tensor, dim: int = 3) -> tuple[torch.Tensor, Targets]:
    """Images (N, C, H, W) where the bool mask `flip` (N,) says so mirrored along `dim` (3: left-right, 2:
    top-bottom), with their boxes and masks."""
    out = torch.where(flip.view(-1, 1, 1, 1), x.flip(dim), x)
    if isinstance(y, dict):
        y = dict(y)
        size = x.shape[dim]
        if "boxes" in y:
            b = y["boxes"]
            lo, hi = (0, 2) if dim == 3 else (1, 3)  # the coordinates along the mirrored axis
            mirrored = b.clone()
            mirrored[..., lo], mirrored[..., hi] = size - b[..., hi], size - b[..., lo]
            y["boxes"] = torch.where(flip.view(-1, 1, 1), mirrored, b)
        for k in _MASKS:
            if k in y:
                y[k] = torch.where(flip.view(-1, 1, 1), y[k].flip(dim - 1), y[k])
    return out, y


class _Flip(Augmentation):
    dim = 3  # mirror along this axis of (N, C, H, W)

    def __call__(self, x, y, gen, rng):
        return mirror(x, y, _rand(x.shape[0], gen) < 0.5, self.dim)


@register_augmentation
class HFlip(_Flip):
    name, dim = "hflip", 3


@register_augmentation
class VFlip(_Flip):
    name, dim = "vflip", 2


@register_augmentation
class AltFlip(Augmentation):
    """Alternating left-right mirroring (Jordan, 2024): a random half of the images is mirrored in the first epoch,
    and from then on every image is mirrored in every other epoch, so any two consecutive epochs show both views
    of each image (random flips show the same view twice in a row to half of them). It depends on each image's
    index and the epoch, which only the batch iterator knows: `DeviceBatches(alternate_flip=True)` applies it, and
    the pipeline passes it over."""

    name = "altflip"
    by_batches = True

    def __call__(self, x, y, gen, rng):
        return x, y


def alternates_flip(specs: list[str]) -> bool:
    """Whether `data.augment` asks for alternating flips (applied by the batch iterator, not the pipeline)."""
    return any(str(s).split(":")[0] == AltFlip.name for s in specs)


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


def _place_boxes(y: dict, b: torch.Tensor, h: int, w: int) -> None:
    """Set y's boxes to `b` (N, M, 4) moved boxes, clipped to the h x w image; those left with no area dropped
    (label -1)."""
    b[..., 0::2] = b[..., 0::2].clamp(0, w)
    b[..., 1::2] = b[..., 1::2].clamp(0, h)
    gone = (b[..., 2] - b[..., 0] <= 0) | (b[..., 3] - b[..., 1] <= 0)
    y["boxes"] = torch.where(gone[..., None], torch.zeros_like(b), b)
    y["box_labels"] = torch.where(gone, torch.full_like(y["box_labels"], -1), y["box_labels"])


def _shift_targets(y: dict, sx: torch.Tensor, sy: torch.Tensor, h: int, w: int, batch, rows, cols, pad: int) -> dict:
    """Targets of images translated by (sx, sy) pixels: boxes shifted and clipped to the image, those left with
    no area dropped (label -1); masks shifted by the same gather as the pixels, zero where the pad came in."""
    y = dict(y)
    if "boxes" in y:
        _place_boxes(y, y["boxes"] + torch.stack([sx, sy, sx, sy], 1)[:, None, :], h, w)  # (N, M, 4)
    for k in _MASKS:
        if k in y:
            mp = torch.nn.functional.pad(y[k], (pad, pad, pad, pad))  # (N, H+2p, W+2p), zero = no object
            y[k] = mp[batch, rows, cols]
    return y


@register_augmentation
class Translate(Crop):
    name = "translate"


@register_augmentation
class ScaleJitter(Augmentation):
    """The batch zoomed by one factor drawn uniformly from [LO, HI], then cut (zoomed in) or padded with the mean
    (zoomed out) back to its size at a random place: multi-scale training, the scale jitter of detection recipes.
    Boxes and masks move with the pixels; a box left without area is dropped."""

    name = "scale"
    default = (0.5, 1.5)
    arity = 2

    def __init__(self, arg=None):
        super().__init__(arg)
        lo, hi = self.arg
        if not 0 < lo <= hi:
            raise VisrecError(f"data.augment scale:{lo:g},{hi:g}: give two factors, 0 < low <= high",
                              "e.g. scale:0.5,1.5")

    def __repr__(self) -> str:
        return f"{self.name}:{self.arg[0]:g},{self.arg[1]:g}"

    def __call__(self, x, y, gen, rng):
        n, c, h, w = x.shape
        f = float(rng.uniform(*self.arg))  # on the host: no device sync
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        zoomed = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                                                 antialias=f < 1)
        # per axis: a window of the zoomed batch (larger) or a place for it on the canvas (smaller)
        (sy, dy, hh), (sx, dx, ww) = (_place(new, old, rng) for new, old in ((nh, h), (nw, w)))
        out = torch.zeros_like(x)
        out[:, :, dy:dy + hh, dx:dx + ww] = zoomed[:, :, sy:sy + hh, sx:sx + ww]
        if isinstance(y, dict):
            y = dict(y)
            if "boxes" in y:
                scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], device=x.device)
                shift = torch.tensor([dx - sx, dy - sy, dx - sx, dy - sy], device=x.device, dtype=torch.float32)
                _place_boxes(y, y["boxes"] * scale + shift, h, w)
            for k in _MASKS:
                if k in y:
                    m = torch.nn.functional.interpolate(y[k][:, None].float(), size=(nh, nw), mode="nearest")[:, 0]
                    canvas = torch.zeros_like(y[k])
                    canvas[:, dy:dy + hh, dx:dx + ww] = m[:, sy:sy + hh, sx:sx + ww].to(y[k].dtype)
                    y[k] = canvas
        return out, y


def _place(new: int, old: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(start in the zoomed axis, start on the canvas, length) of what is kept of an axis zoomed from `old` to `new`."""
    offset = int(rng.integers(0, abs(new - old) + 1))
    return (offset, 0, old) if new >= old else (0, offset, new)


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


@register_augmentation
class RandomErasing(Augmentation):
    name = "erase"
    default = 0.5
    area = (0.02, 0.4)  # the paper's s_l and s_h: the rectangle's share of the image
    ratio = 0.3  # aspect ratios in [r, 1/r], log-uniform

    def __init__(self, arg=None):
        super().__init__(arg)
        if not 0 <= self.arg <= 1:
            raise VisrecError(f"data.augment erase:{self.arg:g}: the probability must be within [0, 1]",
                              "e.g. erase:0.5 (the paper's)")

    def __call__(self, x, y, gen, rng):
        n, c, h, w = x.shape
        lo, hi = self.area
        share = lo + (hi - lo) * _rand(n, gen)
        aspect = torch.exp(math.log(self.ratio) * (1 - 2 * _rand(n, gen)))
        eh = (share * h * w * aspect).sqrt().round().clamp(1, h)  # heights and widths that fit: clipped to
        ew = (share * h * w / aspect).sqrt().round().clamp(1, w)  # the image instead of drawn again
        y0 = (_rand(n, gen) * (h - eh + 1)).floor()
        x0 = (_rand(n, gen) * (w - ew + 1)).floor()
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_y = (rows >= y0[:, None]) & (rows < (y0 + eh)[:, None])  # (N, H)
        in_x = (cols >= x0[:, None]) & (cols < (x0 + ew)[:, None])  # (N, W)
        erase = in_y[:, :, None] & in_x[:, None, :] & (_rand(n, gen) < self.arg)[:, None, None]  # (N, H, W)
        noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.dtype)
        return torch.where(erase[:, None], noise, x), y


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


class _PixelAugmentation(Augmentation):
    """Runs on pixel values 0..1: un-normalizes the batch, changes it, clips to 0..1 and normalizes it again."""

    pixels = True

    def bind(self, mean, std, images):
        self.mean, self.std = mean.float(), std.float()

    def __call__(self, x, y, gen, rng):
        if not hasattr(self, "mean"):
            raise VisrecError(f"augmentation {self.name} needs the normalization it undoes",
                              "build the Pipeline with normalizer= (training does)")
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        p = (x.float() * std + mean) / 255.0
        p = self.change(p, gen).clamp_(0.0, 1.0)
        return ((p * 255.0 - mean) / std).to(x.dtype), y

    def change(self, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


def _gray(p: torch.Tensor) -> torch.Tensor:
    if p.shape[1] == 1:
        return p
    r, g, b = p.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _uniform(n: int, spread: float, gen: torch.Generator, low: float = 1.0) -> torch.Tensor:
    """(n, 1, 1, 1) factors U(low - spread, low + spread), never below 0."""
    return (low + (2 * _rand(n, gen) - 1) * spread).clamp_min(0.0).view(n, 1, 1, 1)


# RGB <-> YIQ: hue is the angle in the IQ plane
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)


@register_augmentation
class ColorJitter(_PixelAugmentation):
    name = "color_jitter"
    default = (0.4, 0.4, 0.4, 0.0)
    arity = 4

    def __init__(self, arg=None):
        super().__init__(arg)
        b, c, s, h = self.arg
        if not 0 <= h <= 0.5:
            raise VisrecError(f"data.augment color_jitter: hue {h:g} is outside [0, 0.5] (a fraction of a turn)",
                              "e.g. color_jitter:0.4,0.4,0.4,0.1")

    def change(self, p, gen):
        b, c, s, h = self.arg
        n = p.shape[0]
        if b:
            p = p * _uniform(n, b, gen)
        if c:
            m = _gray(p).mean((1, 2, 3), keepdim=True)
            p = (p - m) * _uniform(n, c, gen) + m
        if p.shape[1] == 3:
            if s:
                g = _gray(p)
                p = (p - g) * _uniform(n, s, gen) + g
            if h:
                theta = (2 * _rand(n, gen) - 1) * h * 2 * math.pi
                cos, sin = theta.cos(), theta.sin()
                rot = torch.zeros(n, 3, 3, device=p.device)
                rot[:, 0, 0] = 1
                rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
                m = _RGB.to(p.device) @ rot @ _YIQ.to(p.device)  # (n, 3, 3)
                p = torch.einsum("nij,njhw->nihw", m, p)
        return p

    def __repr__(self) -> str:
        return f"{self.name}:{','.join(f'{v:g}' for v in self.arg)}"


@register_augmentation
class PCAColor(_PixelAugmentation):
    name = "pca_color"
    default = 0.1

    def bind(self, mean, std, images):
        super().bind(mean, std, images)
        if images is None or images.shape[1] != 3:
            raise VisrecError("data.augment pca_color shifts colors along the RGB covariance's principal axes, and "
                              f"this data has {1 if images is None else images.shape[1]} channel(s)",
                              "use it on color images, or color_jitter:B,C for brightness and contrast")
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:2000]
        px = images[idx].permute(0, 2, 3, 1).reshape(-1, 3).double() / 255.0
        cov = torch.cov(px.T)
        lam, vec = torch.linalg.eigh(cov)
        self.lam, self.vec = lam.clamp_min(0).float(), vec.float()

    def change(self, p, gen):
        n = p.shape[0]
        alpha = torch.randn(n, 3, generator=gen, device=gen.device) * self.arg
        shift = (alpha * self.lam.to(p.device)) @ self.vec.T.to(p.device)  # (n, 3): sum_i a_i lambda_i p_i
        return p + shift.view(n, 3, 1, 1)


def parse_augmentation(spec: str) -> Augmentation:
    name, _, arg = spec.partition(":")
    name = name.strip()
    if name not in AUGMENTATIONS:
        raise unknown_name("augmentation", name, AUGMENTATIONS, "data.augment")
    arity = getattr(AUGMENTATIONS[name], "arity", 1)
    if arg.strip() and AUGMENTATIONS[name].default is None:
        raise VisrecError(f"data.augment {spec!r}: {name} takes no argument", f"write it as {name}")
    if arg and arity > 1:
        try:
            values = tuple(float(v) for v in arg.split(","))
        except ValueError:
            raise VisrecError(f"data.augment {spec!r}: {arg!r} is not {arity} numbers",
                              f"e.g. {name}:{','.join(f'{v:g}' for v in AUGMENTATIONS[name].default)}") from None
        if len(values) > arity or any(v < 0 for v in values):
            raise VisrecError(f"data.augment {spec!r}: give at most {arity} numbers, each >= 0",
                              f"e.g. {name}:{','.join(f'{v:g}' for v in AUGMENTATIONS[name].default)}")
        return AUGMENTATIONS[name](values + (0.0,) * (arity - len(values)))
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

    def __init__(self, specs: list[str], device: torch.device | str = "cpu", seed: int = 0, normalizer=None,
                 images: torch.Tensor | None = None):
        """`normalizer` (the run's, fitted on `images`, the uint8 training images) binds the pixel-space
        augmentations (color_jitter, pca_color) to the values they change."""
        self.steps = [step for step in map(parse_augmentation, specs) if not step.by_batches]
        for step in self.steps:
            if step.pixels and normalizer is not None:
                if normalizer.whitening:
                    raise VisrecError(f"augmentation {step.name} works on pixel values, which data.normalize="
                                      f"{normalizer.mode} does not keep (it mixes every pixel into each input)",
                                      "use data.normalize=channel or image with it, or drop it from data.augment")
                step.bind(normalizer.mean, normalizer.std, images)
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

    def reseed(self, seed: int) -> None:
        """Restart both random streams from `seed` (a process of a multi-process run, resuming)."""
        self.gen.manual_seed(seed)
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(map(repr, self.steps))}])"

    def __bool__(self) -> bool:
        return bool(self.steps)


