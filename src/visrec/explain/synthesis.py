"""Images made by gradient descent on the input: class models, fooling images and feature inversions.

    class_model  the image that maximizes a class score, regularized by L2, periodic blur and random jitter
                 (Simonyan et al. 2014; Yosinski et al. 2015)
    fooling      a targeted iterative attack: normalized gradient steps on the target score, stopping at the first
                 step where the prediction flips, so the change is as small as the step allows (Szegedy et al.
                 2014; Goodfellow et al. 2015)
    invert       an image whose features at a stage match a given image's, with total-variation and L2
                 regularizers (Mahendran and Vedaldi 2015)

All work in the model's normalized input space and keep images inside the valid pixel range [0, 255]; the model's
weights, mode and gradients are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@contextmanager
def _frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with parameters not requiring gradients, restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        model.train(was_training)
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def pixel_bounds(normalizer, shape: tuple[int, ...], device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized values of pixel 0 and pixel 255, broadcastable to a (N, C, H, W) batch of `shape`."""
    lo = normalizer(torch.zeros(1, *shape[1:], dtype=torch.uint8)).to(device)
    hi = normalizer(torch.full((1, *shape[1:]), 255, dtype=torch.uint8)).to(device)
    return lo, hi


def to_pixels(x: torch.Tensor, normalizer) -> torch.Tensor:
    """Normalized inputs back to float pixel values in [0, 255] (N, C, H, W)."""
    mean, std = normalizer.mean.to(x.device), normalizer.std.to(x.device)
    return (x * std + mean).clamp(0, 255)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def class_model(model: nn.Module, classes: torch.Tensor, normalizer, shape: tuple[int, int, int], *,
                steps: int = 200, lr: float = 1.0, l2: float = 1e-3, blur_every: int = 10, blur_sigma: float = 0.5,
                jitter: int = 2, seed: int = 0) -> torch.Tensor:
    """One image per class in `classes` that maximizes the class score minus `l2`·||x||², by gradient ascent with
    normalized steps of size `lr`, a random circular shift of up to `jitter` pixels before each step and a Gaussian
    blur every `blur_every` steps. Returns normalized images (N, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    n = len(classes)
    lo, hi = pixel_bounds(normalizer, (n, *shape))
    x = (torch.randn((n, *shape), generator=g) * 0.1).clamp(lo, hi)
    with _frozen(model):
        for t in range(steps):
            dy, dx = (torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist() if jitter else (0, 0))
            xs = torch.roll(x, (dy, dx), (2, 3)).requires_grad_(True)
            score = model(xs).gather(1, classes[:, None]).sum() - l2 * (xs**2).sum()
            (grad,) = torch.autograd.grad(score, xs)
            grad = torch.roll(grad, (-dy, -dx), (2, 3))
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x = (x + lr * step).clamp(lo, hi)
            if blur_every and (t + 1) % blur_every == 0 and t + 1 < steps:
                x = _blur(x, blur_sigma).clamp(lo, hi)
    return x.detach()


@dataclass
class Fooled:
    images: torch.Tensor  # normalized adversarial images (N, C, H, W)
    fooled: list[bool]  # whether the prediction became the target
    steps: list[int]  # steps taken until then (or the limit)
    linf: list[float]  # largest change of any pixel, in pixel units (0..255)
    l2: list[float]  # L2 norm of the change in pixel units


def fooling(model: nn.Module, x: torch.Tensor, target: torch.Tensor, normalizer, *, step: float = 0.5,
            max_steps: int = 200) -> Fooled:
    """Targeted attack: x <- x + step·g/||g|| with g the gradient of the target class score, each image stopping at
    the first step where the model predicts `target` (so the change is the smallest this step size finds)."""
    lo, hi = pixel_bounds(normalizer, tuple(x.shape), x.device)
    adv = x.detach().clone()
    done = torch.zeros(len(x), dtype=torch.bool)
    taken = torch.zeros(len(x), dtype=torch.long)
    with _frozen(model):
        with torch.no_grad():
            done |= model(adv).argmax(1) == target
        for _ in range(max_steps):
            if bool(done.all()):
                break
            xs = adv.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(xs).gather(1, target[:, None]).sum(), xs)
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            move = (~done).float().view(-1, 1, 1, 1)
            adv = (adv + move * step * grad / norm).clamp(lo, hi).detach()
            taken += (~done).long()
            with torch.no_grad():
                done |= model(adv).argmax(1) == target
    change = to_pixels(adv, normalizer) - to_pixels(x, normalizer)
    return Fooled(adv, done.tolist(), taken.tolist(), change.flatten(1).abs().amax(1).tolist(),
                  change.flatten(1).norm(dim=1).tolist())


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).sum() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).sum()


def invert(model: nn.Module, x: torch.Tensor, stage: str, normalizer, *, steps: int = 200, lr: float = 0.05,
           tv: float = 0.05, l2: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """Images whose features at `stage` (a path in the model's `feature_maps`) match those of `x`: Adam on
    ||phi(x') - phi(x)||² / ||phi(x)||² + tv·TV(x') + l2·||x'||², started from noise. Returns normalized images."""
    from ..models import feature_maps

    lo, hi = pixel_bounds(normalizer, tuple(x.shape), x.device)
    g = torch.Generator().manual_seed(seed)
    with _frozen(model):
        with torch.no_grad():
            goal = feature_maps(model, x)[stage]
        scale = goal.flatten(1).pow(2).sum(1).clamp_min(1e-12)
        rec = (torch.randn(x.shape, generator=g) * 0.1).to(x.device).requires_grad_(True)
        opt = torch.optim.Adam([rec], lr=lr)
        pixels = x[0].numel()
        for _ in range(steps):
            feats = feature_maps(model, rec)[stage]
            match = ((feats - goal).flatten(1).pow(2).sum(1) / scale).sum()
            loss = match + (tv * _total_variation(rec) + l2 * rec.pow(2).sum()) / pixels
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                rec.copy_(torch.maximum(torch.minimum(rec, hi), lo))
    return rec.detach()
