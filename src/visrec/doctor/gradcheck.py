"""Gradient check of user-written layers: autograd against centered finite differences, in float64.

Stock PyTorch layers (and visrec's own, which are compositions of them) are trusted; every other
module that owns parameters, or is a leaf, is checked on the inputs it actually receives in a forward
pass of a tiny batch. The scalar checked is sum(output * R) for a fixed random R, so every output
element contributes. The relative error of one coordinate is |a - n| / max(|a|, |n|, 1e-8): the
course's formula, guarded against 0/0.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn


def is_user_module(m: nn.Module) -> bool:
    mod = type(m).__module__
    return not (mod.startswith("torch.") or mod == "torch" or mod.startswith("visrec."))


def custom_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """User-defined modules with their own parameters, or without children (custom ops), outermost model excluded
    unless it is itself a leaf."""
    found = []
    for name, m in model.named_modules():
        if not is_user_module(m):
            continue
        own = any(True for _ in m.parameters(recurse=False))
        leaf = not any(True for _ in m.children())
        if (own or leaf) and (name or leaf):
            found.append((name or type(m).__name__, m))
    return found


@dataclass
class GradCheckResult:
    module: str
    max_rel_error: float
    worst: str = ""  # which tensor and coordinate
    checked: int = 0  # coordinates compared
    errors: dict[str, float] = field(default_factory=dict)  # per tensor


def _capture_inputs(model: nn.Module, modules: list[tuple[str, nn.Module]], x: torch.Tensor) -> dict[str, tuple]:
    seen: dict[str, tuple] = {}
    handles = []
    for name, m in modules:
        def hook(mod, args, name=name):
            if name not in seen:
                seen[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def check_module(name: str, module: nn.Module, inputs: tuple, *, coords: int = 12, eps: float = 1e-6,
                 seed: int = 0) -> GradCheckResult:
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(module).double().eval()
    args = [a.double().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in inputs]
    params = [(f"{name}.{n}", p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
    tensors = [(f"{name} input {i}", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    tensors += params
    with torch.no_grad():
        out0 = m(*args)
    r = torch.randn(out0.shape, generator=g, dtype=torch.float64)

    def f() -> torch.Tensor:
        return (m(*args) * r).sum()

    value = f()
    grads = torch.autograd.grad(value, [t for _, t in tensors], allow_unused=True)
    res = GradCheckResult(name, 0.0)
    for (tname, t), ga in zip(tensors, grads, strict=True):
        ga = torch.zeros_like(t) if ga is None else ga
        flat = t.data.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:coords]
        worst_t = 0.0
        for i in idx.tolist():
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + eps
                fp = f().item()
                flat[i] = old - eps
                fm = f().item()
                flat[i] = old
            num = (fp - fm) / (2 * eps)
            ana = ga.reshape(-1)[i].item()
            rel = abs(ana - num) / max(abs(ana), abs(num), 1e-8)
            res.checked += 1
            worst_t = max(worst_t, rel)
            if rel > res.max_rel_error:
                res.max_rel_error, res.worst = rel, f"{tname}[{i}]: autograd {ana:.6g}, numeric {num:.6g}"
        res.errors[tname] = worst_t
    return res


def gradient_check(model: nn.Module, x: torch.Tensor, **kw) -> list[GradCheckResult]:
    """Check every user-defined module of `model` on the inputs it receives for batch `x` (float32 ok)."""
    mods = custom_modules(model)
    if not mods:
        return []
    was = model.training
    model.eval()
    try:
        inputs = _capture_inputs(model, mods, x)
    finally:
        model.train(was)
    return [check_module(name, m, inputs[name], **kw) for name, m in mods if name in inputs]
