"""Optimizers by name, with parameter groups that keep weight decay off biases and norms."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..config import OptimConfig
from ..errors import VisrecError, unknown_name


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False, lr: float | None = None,
                 lr_factors: dict[str, float] | None = None) -> list[dict]:
    """Groups of weights that decay (matrices and conv kernels) and weights that don't, per learning rate.

    Biases and normalization scales/shifts (parameters with fewer than 2 dims) get no decay unless
    `decay_all`; a model can name more parameters to exempt with a `no_weight_decay()` method. With
    `lr_factors` (parameter name -> factor of `lr`, e.g. per-stage fine-tuning rates) every distinct factor gets
    its own pair of groups, all parameters included; without, parameters that do not require grad are left out.
    """
    exempt = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and lr_factors is None:
            continue
        decays = decay_all or (p.dim() >= 2 and name not in exempt)
        factor = 1.0 if lr_factors is None else lr_factors.get(name, 1.0)
        groups.setdefault((decays, factor), []).append(p)
    out = []
    for (decays, factor), params in sorted(groups.items(), key=lambda kv: (-kv[0][1], not kv[0][0])):
        g = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if lr_factors is not None and lr is not None:
            g["lr"] = lr * factor
        out.append(g)
    return out or [{"params": [], "weight_decay": weight_decay}]


def _sgd(groups, c: OptimConfig):
    return torch.optim.SGD(groups, lr=c.lr, momentum=0.0)


def _momentum(groups, c: OptimConfig):
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)


def _nesterov(groups, c: OptimConfig):
    if c.momentum <= 0:
        raise VisrecError("optim.name=nesterov needs optim.momentum > 0", "for example --set optim.momentum=0.9")
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=True)


def _adagrad(groups, c: OptimConfig):
    return torch.optim.Adagrad(groups, lr=c.lr, eps=c.eps)


def _rmsprop(groups, c: OptimConfig):
    return torch.optim.RMSprop(groups, lr=c.lr, alpha=c.alpha, eps=c.eps, momentum=c.momentum)


def _adam(groups, c: OptimConfig):
    return torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps)


def _adamw(groups, c: OptimConfig):
    return torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), eps=c.eps)


def _lbfgs(groups, c: OptimConfig):
    """torch's L-BFGS over every trainable parameter, in one group (L-BFGS has no per-group options: weight decay
    joins the objective instead, see `l2_penalty`), with a strong-Wolfe line search."""
    params = [p for g in groups for p in g["params"]]
    return torch.optim.LBFGS(params, lr=c.lr, max_iter=c.lbfgs_iters, history_size=c.lbfgs_history,
                             line_search_fn="strong_wolfe")


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `g` (its U V^T), approximately: a quintic Newton-Schulz iteration
    whose coefficients (3.4445, -4.7750, 2.0315) push every singular value towards 1 in a few steps (Jordan et
    al., Muon, 2024). Singular values end in about [0.7, 1.2], which is all the update needs."""
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for convolution kernels, Nesterov SGD for everything else.

    A kernel's update is its Nesterov momentum, flattened to (out, in * kh * kw), orthogonalized and scaled by
    sqrt(max(1, out / in')), so every direction moves by the same amount whatever the gradient's spectrum; the
    group's `lr` is its step. Groups with `muon=False` (biases, normalization, the classifier, anything not a
    conv kernel) take plain Nesterov SGD with their own `lr`. Weight decay is L2 in both."""

    def __init__(self, groups: list[dict], lr: float, momentum: float):
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            mom, wd = g["momentum"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(mom).add_(d)
                d = d.add(buf, alpha=mom)  # Nesterov
                if g["muon"]:
                    flat = d.reshape(len(d), -1)
                    d = orthogonalize(flat).mul_(max(1.0, flat.shape[0] / flat.shape[1]) ** 0.5).view_as(p)
                p.add_(d, alpha=-g["lr"])
        return loss


def _muon(groups, c: OptimConfig):
    """Conv kernels (4-d weights) by Muon at optim.muon_lr; the rest by Nesterov SGD at optim.lr."""
    split = []
    for g in groups:
        kernels = [p for p in g["params"] if p.dim() == 4]
        rest = [p for p in g["params"] if p.dim() != 4]
        factor = g.get("lr", c.lr) / c.lr
        for params, muon in ((kernels, True), (rest, False)):
            if params:
                split.append({**g, "params": params, "muon": muon,
                              "lr": (c.muon_lr if muon else c.lr) * factor})
    return Muon(split, lr=c.lr, momentum=c.momentum)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "nesterov": _nesterov,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": _adamw,
    "lbfgs": _lbfgs,
    "muon": _muon,
}


# optim.name -> the visrec.ref update rule and its hyperparameters, for train.engine=numpy
REF_RULES: dict[str, tuple[str, Callable[[OptimConfig], dict]]] = {
    "sgd": ("sgd", lambda c: {}),
    "momentum": ("sgd_momentum", lambda c: {"momentum": c.momentum}),
    "nesterov": ("sgd_nesterov", lambda c: {"momentum": c.momentum}),
    "rmsprop": ("rmsprop", lambda c: {"decay_rate": c.alpha, "epsilon": c.eps}),
    "adam": ("adam", lambda c: {"beta1": c.betas[0], "beta2": c.betas[1], "epsilon": c.eps}),
}


class RefOptimizer(torch.optim.Optimizer):
    """A visrec.ref update rule (`w, dw, config -> next_w, config`) run in NumPy on each parameter, in place, as a
    torch optimizer: the loop's schedule sets each group's lr, weight decay adds L2 to the gradient as in the other
    optimizers, and the rule's arrays (velocity, moments) live in the state as tensors, so checkpoints resume it."""

    def __init__(self, groups: list[dict], rule: str, lr: float, hyper: dict):
        from ..ref import RULES

        self.rule = RULES[rule]
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0, **hyper})
        self.hyper = list(hyper)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        loss = None if closure is None else closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                w, dw = p.numpy(), p.grad.numpy()
                if g["weight_decay"]:
                    dw = dw + g["weight_decay"] * w
                st = self.state[p]
                cfg = {"learning_rate": g["lr"], **{k: g[k] for k in self.hyper}}
                cfg.update({k: (v.numpy() if torch.is_tensor(v) else v) for k, v in st.items()})
                new_w, cfg = self.rule(w, dw, cfg)
                w[...] = new_w
                for k, v in cfg.items():
                    if k == "learning_rate" or k in self.hyper:
                        continue
                    st[k] = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
        return loss


def build_ref_optimizer(model: nn.Module, cfg: OptimConfig) -> RefOptimizer:
    if cfg.name not in REF_RULES:
        raise VisrecError(f"optim.name={cfg.name} has no update rule in the numpy engine",
                          f"use one of {', '.join(REF_RULES)} with train.engine=numpy")
    rule, hyper = REF_RULES[cfg.name]
    return RefOptimizer(param_groups(model, cfg.weight_decay, cfg.decay_all, cfg.lr), rule, cfg.lr, hyper(cfg))


def l2_penalty(model: nn.Module, weight_decay: float, decay_all: bool = False) -> Callable[[], torch.Tensor] | None:
    """weight_decay / 2 * the squared norm of the parameters SGD would decay (the same set: no biases or norms
    unless decay_all), as a term of the objective; None when there is none."""
    if weight_decay <= 0:
        return None
    groups = param_groups(model, weight_decay, decay_all)
    decayed = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    return lambda: 0.5 * weight_decay * sum((p.float() ** 2).sum() for p in decayed)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr_factors: dict[str, float] | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer named in `cfg`, over `model`'s parameter groups (`lr_factors`: see `param_groups`).

    Weight decay is L2 added to the gradient for every optimizer but AdamW, where it is decoupled.
    """
    if cfg.name == "lbfgs" and lr_factors:
        raise VisrecError("optim.name=lbfgs has one learning rate for every parameter, and this fine-tune sets one "
                          "per layer group", "use another optimizer for a fine-tune with per-stage rates")
    if cfg.name not in OPTIMIZERS:
        raise unknown_name("optimizer", cfg.name, OPTIMIZERS, "optim.name")
    if cfg.lr <= 0:
        raise VisrecError(f"optim.lr={cfg.lr} must be > 0")
    if len(cfg.betas) != 2:
        raise VisrecError(f"optim.betas={cfg.betas} must be two numbers", "for example --set optim.betas=[0.9,0.999]")
    return OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay, cfg.decay_all, cfg.lr, lr_factors), cfg)


def gradient_noise_std(eta: float, gamma: float, step: int) -> float:
    """Neelakantan et al. (2015): the noise added at optimizer step `step` (0-based) has variance
    eta / (1 + step)^gamma."""
    return math.sqrt(eta / (1.0 + step) ** gamma)


@torch.no_grad()
def add_gradient_noise(params: list[torch.Tensor], eta: float, gamma: float, step: int) -> None:
    """Add annealed Gaussian noise to every gradient, from torch's global generator (saved in checkpoints, so a
    resumed run draws the same noise)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or eta <= 0:
        return
    std = gradient_noise_std(eta, gamma, step)
    torch._foreach_add_(grads, [torch.randn_like(g) for g in grads], alpha=std)
