"""Where a run stands, and what makes it resumable: its position, the random states a checkpoint carries, and
the signals that ask it to stop after the current step."""

from __future__ import annotations

import contextlib
import datetime as _dt
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Position:
    """The next batch to train is batch `batch` of 0-based epoch `epoch`; `step` optimizer steps are done."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    best_val: float | None = None  # the best validation value of the task's primary metric
    best_epoch: int = 0
    skipped_steps: int = 0
    started: str = field(default_factory=now)
    planned_steps: int = 0  # the schedule's length, when a time budget set it (0: from train.epochs)

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, m: dict[str, Any]) -> Position:
        best = m.get("best_val", m.get("best_val_acc"))  # checkpoints before tasks named it best_val_acc
        return cls(m["epoch"], m["batch"], m["step"], m["train_seconds"],
                   None if best is None or best < 0 else best, m["best_epoch"], m.get("skipped_steps", 0),
                   m.get("started", now()), m.get("planned_steps", 0))


def capture_rng(augment_gen: torch.Generator) -> dict[str, torch.Tensor]:
    rng = {"torch_cpu": torch.get_rng_state(), "augment": augment_gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def all_finite(model: nn.Module, params_only: bool) -> bool:
    """Whether the model's parameters (and, unless `params_only`, its floating buffers such as batch-norm
    statistics) hold only finite values. One host sync."""
    state = list(model.parameters()) if params_only else [
        t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in state]).all())


class Stopped(BaseException):
    """SIGINT or SIGTERM during work that has no step to stop after (an evaluation): raised where the work is, so
    the caller saves what it has and says what happened. A BaseException, so `except Exception` lets it pass."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def _on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM while the block runs (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_at_once() -> contextlib.AbstractContextManager[None]:
    """SIGINT/SIGTERM raise `Stopped` where the code is."""

    def handler(signum, frame):
        raise Stopped(signal.Signals(signum).name)

    return _on_stop_signals(handler)


def stop_signals(request_stop: Callable[[str], None]) -> contextlib.AbstractContextManager[None]:
    """SIGINT/SIGTERM ask to stop after the current step; a second SIGINT stops at once."""

    def handler(signum, frame):
        request_stop(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return _on_stop_signals(handler)
