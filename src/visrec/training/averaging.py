"""Weight averaging: Polyak averaging as an exponential moving average (EMA) of the weights, stochastic weight
averaging (SWA, Izmailov et al. 2018: the plain mean of weights visited late in training), and the batch-norm
recomputation that averaged weights need."""

from __future__ import annotations

import copy

import torch
from torch import nn


class _Average:
    """A frozen copy of the model whose parameters are a running average of the model's."""

    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def _merge(self, model: nn.Module, weight: float) -> None:
        """avg += weight * (w - avg) for every parameter."""
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], weight)


class EMA(_Average):
    """`avg = d * avg + (1 - d) * w` after each step, with d warmed up as min(decay, (1+n)/(10+n)) so
    the average is not dominated by the random initial weights in short runs. Buffers (batch-norm
    statistics) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(model)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self._merge(model, 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates)))
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])


class SWA(_Average):
    """The equal-weight mean of every snapshot passed to `update` (the first one replaces the copy). Batch-norm
    statistics of the mean must be recomputed before use (`recompute_batchnorm`)."""

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self._merge(model, 1.0 / self.updates)  # running mean: avg += (w - avg) / n

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, images: torch.Tensor, normalizer, batch_size: int = 256) -> nn.Module:
    """Replace every batch-norm layer's running statistics by the exact averages over `images` (train mode
    forward passes, cumulative averaging): averaged weights do not match any run's statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for chunk in images.split(batch_size):
        model(normalizer(chunk.to(device)))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)
    return model
