"""The loss of one training batch, composed: the task's loss, plus auxiliary heads (GoogLeNet), plus distillation
from teachers; and what to tell the user when that loss stops being finite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..device import autocast
from ..errors import VisrecError
from .distill import Teachers
from .task import Task


class NonFiniteLoss(VisrecError):
    """Training met a NaN or infinite loss."""


class LossStep:
    """`step(outputs, targets, x)` -> the batch's loss, every term on the graph.

        loss = task.loss(outputs) + model.aux_weight * sum(task.loss(aux)) ,  then with teachers
        loss = (1 - alpha) * loss + alpha * T^2 * KL(teachers_T || student_T)
    """

    def __init__(self, task: Task, model: nn.Module, teachers: Teachers | None = None, *,
                 device: torch.device | None = None, amp_dtype: torch.dtype | None = None):
        self.task, self.model, self.teachers = task, model, teachers
        self.device, self.amp_dtype = device, amp_dtype

    def __call__(self, outputs: torch.Tensor, targets: Any, x: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.task.loss(outputs, targets)
        aux = getattr(self.model, "aux_outputs", None)  # auxiliary heads, set by their forward in training only
        if aux and x is not None:
            loss = loss + self.model.aux_weight * sum(self.task.loss(a, targets) for a in aux)
        if self.teachers is not None and x is not None:
            with autocast(self.device, self.amp_dtype):
                soft = self.teachers.loss(outputs, x)
            loss = (1 - self.teachers.alpha) * loss + self.teachers.alpha * soft
        return loss


def nonfinite_error(cfg: Config, lr: float, step: int, epoch: int, checkpoints: Path) -> NonFiniteLoss:
    """The diagnosis of a loss that became NaN or inf at `step` (1-based), when the learning rate was `lr`."""
    causes = [f"the learning rate is too high (lr was {lr:.3g} at that step): try --lr {cfg.optim.lr / 10:.3g}"]
    if cfg.data.normalize == "none":
        causes.append("inputs are raw 0..255 values: use --set data.normalize=channel")
    if cfg.optim.grad_clip == 0:
        causes.append("gradients exploded: try --set optim.grad_clip=1.0")
    causes.append("the model outputs probabilities instead of logits (a softmax before the loss), or a custom "
                  "layer divides by zero or takes log of 0")
    return NonFiniteLoss(
        f"the loss became non-finite (NaN or inf) at step {step} (epoch {epoch}); training stopped. "
        f"The last good checkpoint is in {checkpoints}.",
        "likely causes:\n    - " + "\n    - ".join(causes),
    )
