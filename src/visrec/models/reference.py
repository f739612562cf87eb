"""The course's networks (visrec.ref) as PyTorch modules that run in either engine.

`fc_net` (the course's FullyConnectedNet) and `convnet3` (its ThreeLayerConvNet) hold their parameters under
the course's names (W1, b1, gamma1, ...; weights (in, out) as `x @ W + b` uses them) and compute the same
function two ways:

- `engine="torch"`: torch operations, autograd;
- `engine="numpy"`: the forward and backward passes of visrec.ref, in NumPy, joined to autograd by one
  `torch.autograd.Function` (the loss on the scores stays the loop's).

Batch norm follows the course in both: the biased batch variance, and running averages updated as
`running = 0.9 * running + 0.1 * batch` (torch's own layer keeps the unbiased variance). So one config trains
one network in both engines, and a run trained in NumPy is evaluated, exported and served like any other.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..errors import VisrecError
from ..ref import FullyConnectedNet, ThreeLayerConvNet
from ._registry import register_model

ENGINES = ("torch", "numpy")
BN_MOMENTUM, BN_EPS = 0.9, 1e-5  # the course's convention: the weight of the old running value


class _NumpyPass(torch.autograd.Function):
    """scores = the NumPy network's forward; its backward gives the input's and every parameter's gradient."""

    @staticmethod
    def forward(ctx, module: RefTwin, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        net = module.numpy_net()
        scores, cache = net.forward(x.detach().cpu().numpy(), train=module.training)
        module.store_running_stats()
        ctx.net, ctx.cache, ctx.names, ctx.x_shape = net, cache, module.param_names, x.shape
        return torch.from_numpy(np.ascontiguousarray(scores)).to(x.dtype)

    @staticmethod
    def backward(ctx, dscores: torch.Tensor):
        dx, grads = ctx.net.backward(dscores.detach().cpu().numpy().astype(ctx.net.dtype, copy=False), ctx.cache)
        gx = torch.from_numpy(np.ascontiguousarray(dx)).reshape(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return (None, gx, *[torch.from_numpy(np.ascontiguousarray(grads[n])) for n in ctx.names])


class RefTwin(nn.Module):
    """A visrec.ref network's parameters as nn.Parameters, runnable in either engine."""

    engine: str
    param_names: list[str]

    def _setup(self, ref_net, engine: str) -> None:
        if engine not in ENGINES:
            raise VisrecError(f"engine {engine!r} is not valid", f"use one of {', '.join(ENGINES)}")
        self.engine = engine
        self._ref = ref_net
        self.param_names = list(ref_net.params)
        for name, value in ref_net.params.items():
            self.register_parameter(name, nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32))))

    def numpy_net(self):
        """The NumPy network, its parameters (and running statistics) viewing this module's tensors."""
        p0 = next(self.parameters())
        if p0.device.type != "cpu":
            raise VisrecError(f"the numpy engine runs on the CPU, and this model is on {p0.device}",
                              "use --device cpu (train.engine=numpy sets it when the device is auto)")
        net = self._ref
        net.params = {n: getattr(self, n).detach().numpy() for n in self.param_names}
        net.dtype = net.params[self.param_names[0]].dtype
        for i, bp in enumerate(getattr(net, "bn_params", [])):
            if hasattr(self, f"running_mean{i + 1}"):
                bp["running_mean"] = getattr(self, f"running_mean{i + 1}").numpy()
                bp["running_var"] = getattr(self, f"running_var{i + 1}").numpy()
                bp["momentum"], bp["eps"] = BN_MOMENTUM, BN_EPS
        return net

    def store_running_stats(self) -> None:
        for i, bp in enumerate(getattr(self._ref, "bn_params", [])):
            if hasattr(self, f"running_mean{i + 1}") and "running_mean" in bp:
                getattr(self, f"running_mean{i + 1}").copy_(torch.from_numpy(np.asarray(bp["running_mean"])))
                getattr(self, f"running_var{i + 1}").copy_(torch.from_numpy(np.asarray(bp["running_var"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine == "numpy" and x.device.type != "meta":  # meta: shape checks only
            return _NumpyPass.apply(self, x, *[getattr(self, n) for n in self.param_names])
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _batchnorm(self, h: torch.Tensor, i: int) -> torch.Tensor:
        rm, rv = getattr(self, f"running_mean{i}"), getattr(self, f"running_var{i}")
        if self.training:
            mu, var = h.mean(0), h.var(0, unbiased=False)
            with torch.no_grad():
                rm.mul_(BN_MOMENTUM).add_(mu.detach(), alpha=1 - BN_MOMENTUM)
                rv.mul_(BN_MOMENTUM).add_(var.detach(), alpha=1 - BN_MOMENTUM)
        else:
            mu, var = rm, rv
        return (h - mu) * torch.rsqrt(var + BN_EPS) * getattr(self, f"gamma{i}") + getattr(self, f"beta{i}")


def _seed() -> int:
    """A NumPy seed drawn from torch's generator: the run's seed fixes the NumPy initialization too."""
    return int(torch.randint(0, 2**31 - 1, (), device="cpu").item())


class FCNet(RefTwin):
    def __init__(self, in_features: int, num_classes: int, hidden_dims: list[int], normalization: str | None,
                 dropout_keep: float, weight_scale: float | str, engine: str):
        super().__init__()
        net = FullyConnectedNet(list(hidden_dims), in_features, num_classes, dropout_keep_ratio=dropout_keep,
                                normalization=normalization, weight_scale=weight_scale, dtype=np.float32,
                                seed=_seed())
        self.normalization, self.dropout_keep, self.num_layers = normalization, dropout_keep, len(hidden_dims) + 1
        self._setup(net, engine)
        if normalization == "batchnorm":
            for i, h in enumerate(hidden_dims):
                self.register_buffer(f"running_mean{i + 1}", torch.zeros(h))
                self.register_buffer(f"running_var{i + 1}", torch.ones(h))
        net.dropout_param.pop("seed", None)  # masks from NumPy's global generator, seeded with the run

    def macs_per_example(self, shape: tuple[int, ...]) -> int:
        return sum(getattr(self, f"W{i}").numel() for i in range(1, self.num_layers + 1))

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i in range(1, self.num_layers):
            h = h @ getattr(self, f"W{i}") + getattr(self, f"b{i}")
            if self.normalization == "batchnorm":
                h = self._batchnorm(h, i)
            elif self.normalization == "layernorm":
                h = F.layer_norm(h, h.shape[1:], getattr(self, f"gamma{i}"), getattr(self, f"beta{i}"), BN_EPS)
            h = torch.relu(h)
            if self.dropout_keep < 1:
                h = F.dropout(h, 1 - self.dropout_keep, self.training)
        last = self.num_layers
        return h @ getattr(self, f"W{last}") + getattr(self, f"b{last}")


class ConvNet3(RefTwin):
    def __init__(self, input_dim: tuple[int, int, int], num_classes: int, num_filters: int, filter_size: int,
                 hidden_dim: int, weight_scale: float | str, engine: str):
        super().__init__()
        net = ThreeLayerConvNet(input_dim, num_filters, filter_size, hidden_dim, num_classes,
                                weight_scale=weight_scale, dtype=np.float32, seed=_seed())
        self.pad = (filter_size - 1) // 2
        self._setup(net, engine)

    def macs_per_example(self, shape: tuple[int, ...]) -> int:
        _, h, w = shape
        return self.W1.numel() * h * w + self.W2.numel() + self.W3.numel()

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(F.conv2d(x, self.W1, self.b1, padding=self.pad))
        a = F.max_pool2d(a, 2).flatten(1)
        a = torch.relu(a @ self.W2 + self.b2)
        return a @ self.W3 + self.b3


def _weight_scale(value: Any) -> float | str:
    if value == "he" or (isinstance(value, int | float) and value > 0):
        return value
    raise VisrecError(f"model.kwargs.weight_scale={value!r} is not valid",
                      "use he (std sqrt(2 / fan_in)) or a positive std such as 0.01")


@register_model(family="reference")
def fc_net(*, in_chans: int, num_classes: int, image_size: tuple[int, int], hidden_dims: list[int] | None = None,
           normalization: str | None = None, dropout_keep: float = 1.0, weight_scale: float | str = "he",
           engine: str = "torch") -> nn.Module:
    """The course's FullyConnectedNet: {affine - [batch/layer norm] - relu - [dropout]} x L - affine."""
    hidden = [100, 100] if hidden_dims is None else [int(h) for h in hidden_dims]
    if normalization in ("none", "None", ""):
        normalization = None
    if normalization not in (None, "batchnorm", "layernorm"):
        raise VisrecError(f"model.kwargs.normalization={normalization!r} is not valid",
                          "use batchnorm, layernorm or none")
    if not 0 < dropout_keep <= 1:
        raise VisrecError(f"model.kwargs.dropout_keep={dropout_keep} is not valid",
                          "it is the probability of keeping a unit, in (0, 1]")
    return FCNet(in_chans * math.prod(image_size), num_classes, hidden, normalization, dropout_keep,
                 _weight_scale(weight_scale), engine)


@register_model(family="reference")
def convnet3(*, in_chans: int, num_classes: int, image_size: tuple[int, int], num_filters: int = 32,
             filter_size: int = 7, hidden_dim: int = 100, weight_scale: float | str = "he",
             engine: str = "torch") -> nn.Module:
    """The course's ThreeLayerConvNet: conv - relu - 2x2 max pool - affine - relu - affine."""
    h, w = image_size
    if h % 2 or w % 2:
        raise VisrecError(f"convnet3 pools 2x2 once and needs an even image size, got {h}x{w}",
                          "resize the images to an even size (data.image_size)")
    return ConvNet3((in_chans, h, w), num_classes, num_filters, filter_size, hidden_dim,
                    _weight_scale(weight_scale), engine)


def engine_model(name: str, kwargs: dict[str, Any], engine: str) -> tuple[str, dict[str, Any]]:
    """The model `name` with `kwargs` trains as in the numpy engine: linear and mlp become fc_net (the zoo's
    hidden/depth/dropout read as the course's hidden_dims/dropout_keep), and the engine joins the kwargs."""
    if engine == "torch":
        return name, kwargs
    kw = dict(kwargs)
    if name == "linear":
        if kw:
            raise VisrecError(f"model linear takes no kwargs, got {sorted(kw)}")
        return "fc_net", {"hidden_dims": [], "engine": engine}
    if name == "mlp":
        known = {"hidden", "depth", "dropout", "act", "normalization", "weight_scale"}
        extra = sorted(set(kw) - known)
        if extra:
            raise VisrecError(f"model mlp in the numpy engine takes {', '.join(sorted(known))}; got {', '.join(extra)}")
        if kw.get("act", "relu") != "relu":
            raise VisrecError(f"model.kwargs.act={kw['act']!r}: the numpy engine's fc_net uses relu")
        out = {"hidden_dims": [int(kw.get("hidden", 256))] * (int(kw.get("depth", 2)) - 1),
               "dropout_keep": 1.0 - float(kw.get("dropout", 0.0)), "engine": engine}
        for k in ("normalization", "weight_scale"):
            if k in kw:
                out[k] = kw[k]
        return "fc_net", out
    if name in ("fc_net", "convnet3"):
        return name, {**kw, "engine": engine}
    raise VisrecError(f"model {name!r} has no numpy implementation",
                      "train.engine=numpy trains linear, mlp, fc_net or convnet3")
