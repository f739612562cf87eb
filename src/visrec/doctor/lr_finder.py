"""The learning-rate range test: raise the learning rate exponentially, one batch per step, and watch the loss.

The loss first stays flat (the rate is too small to matter), then falls, then blows up. The rate at
the smoothed minimum marks the top of the useful range; `suggested` is one tenth of it (the usual
choice for a constant rate; one-cycle schedules may peak near the minimum itself). The smoothing is an
exponential average with bias correction (beta 0.8), so the reported minimum lags by a few steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

ADAPTIVE = ("adam", "adamw", "rmsprop", "adagrad")


@dataclass
class LRFinderResult:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw, per step
    smoothed: list[float] = field(default_factory=list)
    lr_at_min: float | None = None
    lr_diverged: float | None = None  # the rate at which the smoothed loss passed 4x its minimum (or went NaN)
    suggested: float | None = None
    drop: float = 0.0  # (first smoothed loss - best) / first: how much the loss fell at all

    @property
    def conclusive(self) -> bool:
        return self.lr_at_min is not None and self.drop >= 0.1

    def to_dict(self) -> dict:
        return {"lr_at_min": self.lr_at_min, "lr_diverged": self.lr_diverged, "suggested": self.suggested,
                "drop": round(self.drop, 4), "conclusive": self.conclusive, "steps": len(self.lrs)}


def default_range(optimizer_name: str, configured: float) -> tuple[float, float]:
    lo, hi = (1e-7, 1.0) if optimizer_name in ADAPTIVE else (1e-6, 10.0)
    return min(lo, configured / 100), max(hi, configured * 10)


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    lr_min: float,
    lr_max: float,
    steps: int = 100,
    beta: float = 0.8,
    stop_factor: float = 4.0,
) -> LRFinderResult:
    """Run the sweep on `model` (modified in place: pass a fresh copy). `batch(i)` returns step i's inputs."""
    res = LRFinderResult()
    avg, best = 0.0, math.inf
    model.train()
    for i in range(steps):
        lr = lr_min * (lr_max / lr_min) ** (i / max(steps - 1, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = batch(i)
        loss = loss_fn(model(x), y)
        value = loss.item()
        res.lrs.append(lr)
        res.losses.append(value)
        if not math.isfinite(value):
            res.smoothed.append(float("nan"))
            res.lr_diverged = lr
            break
        avg = beta * avg + (1 - beta) * value
        sm = avg / (1 - beta ** (i + 1))
        res.smoothed.append(sm)
        if sm < best:
            best, res.lr_at_min = sm, lr
        if i > 5 and sm > stop_factor * best:
            res.lr_diverged = lr
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finite = [s for s in res.smoothed if math.isfinite(s)]
    if finite and finite[0] > 0:
        res.drop = (finite[0] - min(finite)) / finite[0]
    if res.lr_at_min is not None:
        res.suggested = res.lr_at_min / 10
    return res
