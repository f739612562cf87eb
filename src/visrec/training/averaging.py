"""Weight averaging: Polyak averaging as an exponential moving average (EMA) of the weights, stochastic weight
averaging (SWA, Izmailov et al. 2018: the plain mean of weights visited late in training), and the batch-norm
recomputation that averaged weights need."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

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
def recompute_batchnorm(model: nn.Module, images: torch.Tensor, normalizer, batch_size: int = 256,
                        forward: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> nn.Module:
    """Replace every batch-norm layer's running statistics by the exact averages over `images` (train mode
    forward passes, cumulative averaging): averaged weights do not match any run's statistics. `forward(model, x)`
    is the pass (the task's `statistics_forward`; default: the model's forward)."""
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
        x = normalizer(chunk.to(device))
        if forward is None:
            model(x)
        else:
            forward(model, x)
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.train(was_training)
    return model


class WeightAverages:
    """The averages a run keeps beside its weights: an EMA updated after every optimizer step, and SWA over the
    final `swa` fraction of the steps (every `swa_every` steps, else at each epoch end), its batch-norm statistics
    recomputed once the average is final."""

    def __init__(self, model: nn.Module, *, ema: float, swa: float, swa_every: int, total_steps: int):
        self.ema = EMA(model, ema) if ema > 0 else None
        self.swa: SWA | None = None  # created at its first update
        self.swa_start = round((1 - swa) * total_steps) if swa > 0 else None
        self.swa_every = swa_every if self.swa_start is not None else 0

    def after_step(self, model: nn.Module, step: int, stepped: bool) -> None:
        """After optimizer step `step` (1-based); `stepped` is False for a step skipped as non-finite."""
        if stepped and self.ema is not None:
            self.ema.update(model)
        if self.swa_every and step >= self.swa_start and (step - self.swa_start) % self.swa_every == 0:
            self._swa_update(model)

    def end_epoch(self, model: nn.Module, step: int, final: bool, images: torch.Tensor, normalizer,
                  batch_size: int, forward: Callable[[nn.Module, torch.Tensor], Any] | None = None) -> None:
        if self.swa_start is not None and not self.swa_every and step >= self.swa_start:
            self._swa_update(model)
        if self.swa is not None and final:  # the average is final: fit its batch-norm statistics
            recompute_batchnorm(self.swa.module, images, normalizer, batch_size=batch_size, forward=forward)

    def _swa_update(self, model: nn.Module) -> None:
        if self.swa is None:
            self.swa = SWA(model)
        self.swa.update(model)

    def models(self, model: nn.Module, final: bool) -> dict[str, nn.Module]:
        """The weights to compare: raw, and the EMA and SWA averages when on (SWA once it is `final`); the last
        one is the weights the run is judged by."""
        out = {"raw": model}
        if self.ema is not None:
            out["ema"] = self.ema.module
        if self.swa is not None and final:
            out["swa"] = self.swa.module
        return out

    def label(self) -> str:
        return "+swa" if self.swa else "+ema" if self.ema else ""

    def state(self) -> dict:
        return {"ema": self.ema.state_dict() if self.ema else None, "swa": self.swa.state_dict() if self.swa else None}

    def load(self, model: nn.Module, state: dict, ema_weights: dict | None, swa_weights: dict | None) -> None:
        if self.ema is not None and ema_weights is not None:
            self.ema.module.load_state_dict(ema_weights)
            self.ema.load_state_dict(state["ema"])
        if swa_weights is not None:
            self.swa = SWA(model)
            self.swa.module.load_state_dict(swa_weights)
            self.swa.load_state_dict(state["swa"])
