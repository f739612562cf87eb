"""Weight initialization schemes (`model.init`), applied to every convolution and linear layer of a fresh model,
with biases zeroed. Normalization layers keep their own (scale 1, shift 0); a fitted whitening stem is left alone.

    default          each layer's own initialization (PyTorch's: uniform, about 1/sqrt(fan_in) / sqrt(3))
    normal:STD       the course's "small random numbers": N(0, STD^2), e.g. normal:0.01
    xavier           Glorot & Bengio (2010): uniform, variance 2 / (fan_in + fan_out); also xavier_uniform
    xavier_normal    the same variance, normal
    he               He et al. (2015): normal, variance 2 / fan_in (the ReLU's factor of 2); also he_normal
    he_fan_out       variance 2 / fan_out (keeps the backward pass's gradients at scale)
    he_uniform       uniform, variance 2 / fan_in
    orthogonal       Saxe et al. (2014): a (semi-)orthogonal matrix per layer, gain 1
    dirac            identity-preserving convolutions (airbench's init): in each convolution with an odd kernel,
                     the first min(in, out) filters pass their input channel through unchanged (a centred 1),
                     the other filters and every linear layer keep the layer's own initialization
    lsuv             Mishkin & Matas (2016), data-dependent: orthogonal, then each layer in forward order is scaled
                     until its output variance on a batch of training images is 1

fan_in / fan_out of a convolution are in_channels / out_channels times the kernel's area (per group).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import VisrecError

SCHEMES = ("default", "normal:STD", "xavier", "xavier_uniform", "xavier_normal", "he", "he_normal", "he_fan_out",
           "he_uniform", "orthogonal", "dirac", "lsuv")
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def parse_init(spec: str) -> tuple[str, float | None]:
    """`model.init` -> (scheme, std for normal:STD); a bad value is an error naming the key and the choices."""
    name, sep, arg = (spec or "default").partition(":")
    if name == "normal":
        try:
            std = float(arg)
        except ValueError:
            std = float("nan")
        if not sep or not math.isfinite(std) or std <= 0:
            raise VisrecError(f"model.init {spec!r}: normal needs a positive standard deviation",
                              "e.g. --set model.init=normal:0.01")
        return name, std
    if sep or name not in SCHEMES:
        raise VisrecError(f"model.init {spec!r} is not an initialization visrec knows",
                          f"use one of: {', '.join(SCHEMES)}")
    return name, None


def init_layers(model: nn.Module) -> list[nn.Module]:
    """The layers an initialization scheme sets: convolutions and linear layers, in forward (definition) order,
    minus a whitening stem fitted from data."""
    from .layers import PatchWhitening

    return [m for m in model.modules() if isinstance(m, LAYERS) and not isinstance(m, PatchWhitening)]


@torch.no_grad()
def init_weights(model: nn.Module, spec: str, data: torch.Tensor | None = None, *, tol: float = 0.02,
                 max_iter: int = 10) -> nn.Module:
    """Apply `spec` (see the module doc) to `model` in place; `data` is a batch of preprocessed inputs, needed by
    lsuv. Uses torch's global random generator (seed it for reproducible weights)."""
    name, std = parse_init(spec)
    if name == "default":
        return model
    layers = init_layers(model)
    for m in layers:
        w = m.weight
        if name == "dirac":
            _dirac(m)
        elif name == "normal":
            nn.init.normal_(w, 0.0, std)
        elif name in ("xavier", "xavier_uniform"):
            nn.init.xavier_uniform_(w)
        elif name == "xavier_normal":
            nn.init.xavier_normal_(w)
        elif name in ("he", "he_normal"):
            nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")
        elif name == "he_fan_out":
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        elif name == "he_uniform":
            nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu")
        else:  # orthogonal, and lsuv's start
            nn.init.orthogonal_(w)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    if name == "lsuv":
        if data is None or not len(data):
            raise VisrecError("model.init lsuv scales each layer on a batch of training images, and none was given",
                              "train through visrec (it passes the batch), or call init_weights(model, 'lsuv', x)")
        _lsuv(model, layers, data, tol, max_iter)
    return model


def _dirac(m: nn.Module) -> None:
    """Filter i of a convolution copies input channel i (i < min(in, out), within its group), centred; the
    remaining filters, even kernels and linear layers keep their own initialization."""
    w = m.weight
    if isinstance(m, nn.Linear) or any(k % 2 == 0 for k in w.shape[2:]):
        return
    groups = getattr(m, "groups", 1)
    per_group = w.shape[0] // groups
    n = min(per_group, w.shape[1])
    for g in range(groups):
        nn.init.dirac_(w[g * per_group : g * per_group + n])


def _lsuv(model: nn.Module, layers: list[nn.Module], x: torch.Tensor, tol: float, max_iter: int) -> None:
    was_training = model.training
    model.eval()  # normalization layers use their (fresh) running statistics: the scaling is what it will see
    try:
        for layer in layers:
            seen: dict[str, torch.Tensor] = {}
            handle = layer.register_forward_hook(lambda mod, inp, out, seen=seen: seen.__setitem__("out", out))
            try:
                for _ in range(max_iter):
                    seen.clear()
                    model(x)
                    if "out" not in seen:
                        break  # a layer the forward pass does not reach (an unused head): left orthogonal
                    var = float(seen["out"].float().var())
                    if not math.isfinite(var) or var < 1e-12 or abs(var - 1.0) < tol:
                        break
                    layer.weight.div_(math.sqrt(var))
            finally:
                handle.remove()
    finally:
        model.train(was_training)


__all__ = ["SCHEMES", "init_layers", "init_weights", "parse_init"]
