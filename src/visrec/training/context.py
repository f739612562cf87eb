"""What a task's training step is given (`Task.train_step(xb, yb, ctx)`): the loop's forward pass, its optimizers
and one `update` that applies the loop's policies (gradient noise, clipping, the non-finite policy) to a loss.

The default step is the loop's usual one: forward, one update of every parameter. A task whose model has parts
trained by separate losses (a GAN's generator and critic) declares its optimizers (`Task.optimizers`) and writes
its own step from the same pieces: `ctx.inputs` (the batch normalized and augmented as every task's is),
`ctx.net` (the model, wrapped for DDP or compiled when the run asks), `ctx.autocast()` and `ctx.update(loss, name)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..device import autocast
from .optim import add_gradient_noise


class Optimizers:
    """Several named optimizers the loop treats as one: the learning-rate schedule sees every param group, the
    checkpoint stores one optimizer state (each group tagged with its optimizer's name), `step` steps them all."""

    def __init__(self, named: dict[str, torch.optim.Optimizer]):
        self.named = dict(named)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.named.values() for g in opt.param_groups]

    @property
    def defaults(self) -> dict[str, Any]:
        return next(iter(self.named.values())).defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.named.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.named.values():
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        """One optimizer's state: parameters numbered across the optimizers, each group naming its optimizer."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for name, opt in self.named.items():
            sd = opt.state_dict()
            count = sum(len(g["params"]) for g in sd["param_groups"])
            state.update({offset + int(pid): st for pid, st in sd["state"].items()})
            groups += [{**g, "params": [offset + p for p in g["params"]], "optimizer": name}
                       for g in sd["param_groups"]]
            offset += count
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for name, opt in self.named.items():
            groups = [g for g in sd["param_groups"] if g.get("optimizer") == name]
            ids = [p for g in groups for p in g["params"]]
            local = {p: i for i, p in enumerate(sorted(ids))}
            opt.load_state_dict({
                "state": {local[int(pid)]: st for pid, st in sd["state"].items() if int(pid) in local},
                "param_groups": [{**{k: v for k, v in g.items() if k != "optimizer"},
                                  "params": [local[p] for p in g["params"]]} for g in groups]})


@dataclass
class StepContext:
    """The loop's pieces for one training step (see the module doc)."""

    net: nn.Module  # what computes: the model, or its DDP wrapper / compiled form
    model: nn.Module  # the model itself (its parts, buffers and methods)
    optimizer: torch.optim.Optimizer | Optimizers
    forward: Callable[[torch.Tensor, Any], tuple[Any, torch.Tensor, Any]]  # (xb, yb) -> (outputs, loss, targets)
    inputs: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]  # (xb, yb) -> (model input, targets)
    device: torch.device
    amp_dtype: torch.dtype | None
    step: int  # optimizer steps taken before this one
    params: list[torch.Tensor] = field(default_factory=list)  # the model's, in its order (clipping sums over them)
    clip: float = 0.0
    noise: float = 0.0
    noise_gamma: float = 0.55
    skip_nonfinite: bool = False

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with autocast(self.device, self.amp_dtype):
            yield

    def update(self, loss: torch.Tensor, optimizer: str | None = None) -> bool:
        """Backpropagate `loss` and step `optimizer` (a name of the task's optimizers; None: all of them), with the
        run's gradient noise, clipping and non-finite policy. False when the step was skipped (a non-finite loss
        under train.nonfinite=skip)."""
        opt = self.optimizer if optimizer is None else self.optimizer.named[optimizer]  # type: ignore[union-attr]
        params = self.params if optimizer is None and self.params else [p for g in opt.param_groups
                                                                         for p in g["params"]]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.noise > 0:
            add_gradient_noise(params, self.noise, self.noise_gamma, self.step)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        stepped = not (self.skip_nonfinite and not torch.isfinite(loss))  # host sync, only when asked for
        if stepped:
            opt.step()
        return stepped
