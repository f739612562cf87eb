"""Gradient check of hand-written backward passes: autograd against centered finite differences.

A backward can only be wrong where someone wrote it: a `torch.autograd.Function` subclass, or a hook that
changes gradients. A layer that is a plain composition of PyTorch operations is differentiated by autograd
and cannot disagree with its own forward, so it is not checked (checking it only measures rounding: a layer
that casts its input to float32 fails a float64 check with a correct backward). Each user-defined module
that owns parameters or is a leaf is run on the inputs it actually receives in a forward pass of a tiny
batch; those whose graph holds a custom Function's node, or that carry backward hooks, are checked.

The check runs in float64 (step 1e-6); a layer that computes in lower precision whatever its input (it casts)
is checked at its own precision, with a step (1e-2), a tolerance and a comparison scale to match, and the
result says so. The scalar checked is sum(output * R) for a fixed random R, so every output element
contributes. The relative error of one coordinate is |a - n| / max(|a|, |n|, 1e-8): the course's formula,
guarded against 0/0 (in lower precision the floor is 1% of the tensor's largest gradient).
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
    precision: str = "float64"  # what the check computed in (a layer that casts is checked at its own)
    backward: str = ""  # the hand-written part that was checked: a custom Function's name, or "backward hooks"

    @property
    def tolerance(self) -> tuple[float, float]:
        """(warn above, error above) for this precision: float64 differences of a correct backward are < 1e-7;
        float32 ones, at a step of 1e-3, a few 1e-3."""
        return (1e-4, 1e-2) if self.precision == "float64" else (3e-2, 2e-1)


def hand_written_backward(module: nn.Module, inputs: tuple) -> str:
    """What in `module` differentiates by hand, on these inputs: the custom autograd Functions its forward
    calls, or its backward hooks; "" when autograd derives all of it."""
    found: list[str] = []
    if module._backward_hooks or module._backward_pre_hooks or any(
            getattr(p, "_backward_hooks", None) for p in module.parameters(recurse=False)):
        found.append("backward hooks")
    args = [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in inputs]
    with torch.enable_grad():
        out = module(*args)
    outs = [o for o in (out if isinstance(out, tuple | list) else [out]) if isinstance(o, torch.Tensor)]
    stack, seen = [o.grad_fn for o in outs if o.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            name = type(node).__name__.removesuffix("Backward")
            if name not in found:
                found.append(name)
        stack.extend(n for n, _ in node.next_functions)
    return ", ".join(found)


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
    with torch.no_grad():
        out0 = m(*args)
    precision = "float64"
    if isinstance(out0, torch.Tensor) and out0.is_floating_point() and out0.dtype != torch.float64:
        # the layer casts: float64 inputs buy nothing, so check it at the precision it computes in
        precision, eps = str(out0.dtype).replace("torch.", ""), 1e-2
        m = copy.deepcopy(module).float().eval()
        args = [a.float().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in inputs]
        with torch.no_grad():
            out0 = m(*args)
    params = [(f"{name}.{n}", p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
    tensors = [(f"{name} input {i}", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    tensors += params
    r = torch.randn(out0.shape, generator=g, dtype=torch.float64).to(out0.dtype)

    def f() -> torch.Tensor:
        return (m(*args) * r).sum()

    value = f()
    grads = torch.autograd.grad(value, [t for _, t in tensors], allow_unused=True)
    res = GradCheckResult(name, 0.0, precision=precision)
    for (tname, t), ga in zip(tensors, grads, strict=True):
        ga = torch.zeros_like(t) if ga is None else ga
        flat = t.data.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:coords]
        worst_t = 0.0
        # float64: the course's guard against 0/0. Lower precision: a coordinate whose gradient is tiny next to
        # the tensor's largest is compared on that scale, where rounding in the loss stops drowning it.
        floor = 1e-8 if precision == "float64" else 1e-2 * max(ga.abs().max().item(), 1e-8)
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
            rel = abs(ana - num) / max(abs(ana), abs(num), floor)
            res.checked += 1
            worst_t = max(worst_t, rel)
            if rel > res.max_rel_error:
                res.max_rel_error, res.worst = rel, f"{tname}[{i}]: autograd {ana:.6g}, numeric {num:.6g}"
        res.errors[tname] = worst_t
    return res


def gradient_check(model: nn.Module, x: torch.Tensor, **kw) -> list[GradCheckResult]:
    """Check every user-defined module of `model` with a hand-written backward, on the inputs it receives for
    batch `x` (float32 ok). Modules that autograd differentiates are left out: see the module doc."""
    mods = custom_modules(model)
    if not mods:
        return []
    was = model.training
    model.eval()
    try:
        inputs = _capture_inputs(model, mods, x)
        out = []
        for name, m in mods:
            if name not in inputs:
                continue
            backward = hand_written_backward(m, inputs[name])
            if backward:
                res = check_module(name, m, inputs[name], **kw)
                res.backward = backward
                out.append(res)
        return out
    finally:
        model.train(was)
