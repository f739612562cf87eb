"""The logging window: the training steps since the last log line.

Its losses and the task's per-batch sums stay on the device as the steps add them (no host sync on the hot path)
and are reduced once, across processes too, when the window closes; the seconds spent waiting for batches are
counted by wall clock. `record` is the window's line of metrics.jsonl.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..distributed import Dist


class Window:
    def __init__(self, start_step: int):
        self.start_step = start_step
        self.started = time.perf_counter()
        self.losses: list[torch.Tensor] = []
        self.stats: list[torch.Tensor] = []
        self.data_seconds = 0.0

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, stats: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        self.stats.append(stats)

    def reduce(self, dist: Dist) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each step's loss averaged across processes, which of them are finite, the task's sums over the window
        and the processes): one reduction each."""
        losses = dist.mean(torch.stack(self.losses).float())
        return losses, torch.isfinite(losses), dist.sum(torch.stack(self.stats).sum(0))

    def first_nonfinite_step(self, finite: torch.Tensor) -> int:
        """The optimizer step (1-based) whose loss was the window's first non-finite one."""
        return self.start_step + int((~finite).nonzero()[0]) + 1

    def record(self, *, epoch: int, step: int, batch_size: int, losses: torch.Tensor, finite: torch.Tensor,
               stat_fields: Callable[[int], dict[str, float]], lr: float, seconds: float, now: float
               ) -> dict[str, Any]:
        """The window's line of metrics.jsonl (`now`: the clock after the device synced)."""
        n_img = len(self) * batch_size
        elapsed = max(now - self.started, 1e-9)
        return {"epoch": epoch, "step": step, "split": "train", "kind": "window",
                "loss": losses[finite].mean().item() if bool(finite.any()) else float("nan"),
                **stat_fields(n_img), "lr": lr, "seconds": round(seconds, 3), "images_per_s": n_img / elapsed,
                "data_seconds": round(self.data_seconds, 4), "data_share": round(self.data_seconds / elapsed, 4)}
