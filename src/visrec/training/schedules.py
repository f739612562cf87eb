"""Learning-rate schedules by name, as a factor of the base lr at each optimizer step.

With T total steps, t the current step, and E = t / steps_per_epoch the fractional epoch:

    constant       1
    step           gamma ** floor(E / step_epochs)
    exponential    gamma ** E
    inverse_time   1 / (1 + decay * E)                       (the course's 1/t decay)
    linear         1 + (end_factor - 1) * t / T
    cosine         end_factor + (1 - end_factor) * (1 + cos(pi * t / T)) / 2
    cyclic_cosine  the cosine above restarted `cycles` times (SGDR; snapshot ensembles save one model per cycle)
    one_cycle      start_factor -> 1 linearly over pct_start * T, then 1 -> end_factor linearly

`schedule.warmup_epochs` puts a linear warmup from start_factor to 1 in front of any of them; the
schedule then runs over the remaining steps.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch

from ..config import ScheduleConfig
from ..errors import VisrecError, unknown_name

FactorFn = Callable[[int], float]


def _constant(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    return lambda t: 1.0


def _step(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    every = max(1, round(c.step_epochs * spe))
    return lambda t: c.gamma ** (t // every)


def _exponential(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    return lambda t: c.gamma ** (t / spe)


def _inverse_time(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    return lambda t: 1.0 / (1.0 + c.decay * t / spe)


def _linear(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    return lambda t: 1.0 + (c.end_factor - 1.0) * min(t / total, 1.0)


def _cosine(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    return lambda t: c.end_factor + (1 - c.end_factor) * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))


def _cycle_bounds(cycles: int, total: int) -> list[int]:
    """Start step of each cycle, and `total` last."""
    return [round(k * total / cycles) for k in range(cycles + 1)]


def _cyclic_cosine(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    if not 1 <= c.cycles <= total:
        raise VisrecError(f"schedule.cycles={c.cycles} must be between 1 and the number of steps ({total})")
    bounds = _cycle_bounds(c.cycles, total)

    def f(t: int) -> float:
        k = min(bisect.bisect_right(bounds, t) - 1, c.cycles - 1)
        frac = min((t - bounds[k]) / (bounds[k + 1] - bounds[k]), 1.0)
        return c.end_factor + (1 - c.end_factor) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def snapshot_steps(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> list[int]:
    """The steps after which a cyclic schedule ends a cycle (snapshot ensembles save there); [] otherwise."""
    if cfg.name != "cyclic_cosine":
        return []
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    return [warm + b for b in _cycle_bounds(cfg.cycles, max(total_steps - warm, 1))[1:]]


def _one_cycle(c: ScheduleConfig, total: int, spe: int) -> FactorFn:
    if not 0 < c.pct_start < 1:
        raise VisrecError(f"schedule.pct_start={c.pct_start} must be in (0, 1)")
    up = max(1, round(c.pct_start * total))

    def f(t: int) -> float:
        if t < up:
            return c.start_factor + (1 - c.start_factor) * t / up
        return 1.0 + (c.end_factor - 1.0) * min((t - up) / max(total - up, 1), 1.0)

    return f


SCHEDULES: dict[str, Callable[[ScheduleConfig, int, int], FactorFn]] = {
    "constant": _constant,
    "step": _step,
    "exponential": _exponential,
    "inverse_time": _inverse_time,
    "linear": _linear,
    "cosine": _cosine,
    "cyclic_cosine": _cyclic_cosine,
    "one_cycle": _one_cycle,
}


def schedule_factor(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> FactorFn:
    """The factor function for `cfg`, including its warmup."""
    if cfg.name not in SCHEDULES:
        raise unknown_name("schedule", cfg.name, SCHEDULES, "schedule.name")
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if warm < 0 or (total_steps > 0 and warm >= total_steps):
        raise VisrecError(f"schedule.warmup_epochs={cfg.warmup_epochs} must be >= 0 and shorter than training")
    body = SCHEDULES[cfg.name](cfg, max(total_steps - warm, 1), steps_per_epoch)
    if warm == 0:
        return body

    def f(t: int) -> float:
        if t < warm:
            return cfg.start_factor + (1 - cfg.start_factor) * t / warm
        return body(t - warm)

    return f


class LRSchedule:
    """Sets every param group's lr to base_lr * factor(step); its state is just the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: FactorFn):
        self.optimizer, self.factor = optimizer, factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def replace(self, factor: FactorFn) -> None:
        """Follow a new factor from the current step on (a time budget re-planned the schedule's length)."""
        self.factor = factor
        self._apply()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"step": self.step_count, "base_lrs": self.base_lrs}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.base_lrs = list(state["base_lrs"])
        self._apply()
