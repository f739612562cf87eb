"""The course's networks, assembled from the NumPy layers. Each keeps its parameters in `params` (a dict of arrays
named W1, b1, gamma1, ...) and has `loss(X, y=None)`: the scores (N, C) when y is None (test mode), otherwise
`(loss, grads)` with one gradient per parameter, the L2 term `0.5 * reg * sum(W^2)` over the weights (not the
biases, gammas or betas) included.

- TwoLayerNet:        affine - relu - affine - softmax
- FullyConnectedNet:  {affine - [batch/layer norm] - relu - [dropout]} x (L - 1) - affine - softmax
- ThreeLayerConvNet:  conv - relu - 2x2 max pool - affine - relu - affine - softmax
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._check import RefError
from .conv import conv_backward_fast, conv_forward_fast, max_pool_backward_fast, max_pool_forward_fast
from .layers import (
    affine_backward,
    affine_forward,
    batchnorm_backward_alt,
    batchnorm_forward,
    dropout_backward,
    dropout_forward,
    layernorm_backward,
    layernorm_forward,
    relu_backward,
    relu_forward,
    softmax_loss,
)


def _rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


class RefModel:
    """What the Solver and visrec's NumPy engine need from a model."""

    params: dict[str, np.ndarray]
    reg: float
    dtype: Any

    def forward(self, X: np.ndarray, train: bool) -> tuple[np.ndarray, Any]:  # noqa: N803
        """Scores (N, C) and the cache `backward` needs; `train` picks the mode of batch norm and dropout."""
        raise NotImplementedError

    def backward(self, dscores: np.ndarray, cache: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The gradients of the data loss: dX (shaped like X) and one per parameter (no L2 term)."""
        raise NotImplementedError

    def loss(self, X: np.ndarray, y: np.ndarray | None = None):  # noqa: N803
        """Scores (test mode) when y is None; otherwise (softmax loss + L2 term, gradients) in training mode."""
        if y is None:
            return self.forward(X, train=False)[0]
        scores, cache = self.forward(X, train=True)
        loss, dscores = softmax_loss(scores, y)
        _, grads = self.backward(dscores, cache)
        return self._reg(loss, grads), grads

    def _reg(self, loss: float, grads: dict[str, np.ndarray]) -> float:
        for k, w in self.params.items():
            if k.startswith("W"):
                loss += 0.5 * self.reg * float(np.sum(w * w))
                grads[k] = grads[k] + self.reg * w
        return loss

    def set_mode(self, mode: str) -> None:
        """'train' or 'test' for the layers that differ (batch norm, dropout)."""


def _check_input(name: str, X: np.ndarray, shape: tuple[int, ...]) -> None:  # noqa: N803
    if not isinstance(X, np.ndarray) or X.ndim < 2 or int(np.prod(X.shape[1:])) != int(np.prod(shape)):
        raise RefError(f"{name}.loss: X has shape {getattr(X, 'shape', type(X).__name__)}; expected (N, "
                       f"{', '.join(str(s) for s in shape)})")


class TwoLayerNet(RefModel):
    """affine - relu - affine - softmax, weights N(0, weight_scale^2), biases zero."""

    def __init__(self, input_dim: int = 3 * 32 * 32, hidden_dim: int = 100, num_classes: int = 10,
                 weight_scale: float = 1e-3, reg: float = 0.0, dtype=np.float64, seed: int | None = 0):
        r = _rng(seed)
        self.input_dim, self.reg, self.dtype = input_dim, reg, dtype
        self.params = {"W1": (weight_scale * r.standard_normal((input_dim, hidden_dim))).astype(dtype),
                       "b1": np.zeros(hidden_dim, dtype), "W2": (weight_scale * r.standard_normal(
                           (hidden_dim, num_classes))).astype(dtype), "b2": np.zeros(num_classes, dtype)}

    def forward(self, X, train):  # noqa: N803
        _check_input("TwoLayerNet", X, (self.input_dim,))
        p = self.params
        h, c1 = affine_forward(X, p["W1"], p["b1"])
        a, c2 = relu_forward(h)
        scores, c3 = affine_forward(a, p["W2"], p["b2"])
        return scores, (c1, c2, c3)

    def backward(self, dscores, cache):
        c1, c2, c3 = cache
        grads = {}
        d, grads["W2"], grads["b2"] = affine_backward(dscores, c3)
        dx, grads["W1"], grads["b1"] = affine_backward(relu_backward(d, c2), c1)
        return dx, grads


class FullyConnectedNet(RefModel):
    """Any number of hidden layers, with optional batch or layer normalization and dropout.

    dropout_keep_ratio: the probability of keeping a unit (1 = no dropout); normalization: None, 'batchnorm' or
    'layernorm'; weights N(0, weight_scale^2) (or He-scaled with weight_scale='he'), biases zero, gammas one."""

    def __init__(self, hidden_dims: list[int], input_dim: int = 3 * 32 * 32, num_classes: int = 10,
                 dropout_keep_ratio: float = 1.0, normalization: str | None = None, reg: float = 0.0,
                 weight_scale: float | str = 1e-2, dtype=np.float32, seed: int | None = None):
        if normalization not in (None, "batchnorm", "layernorm"):
            raise RefError(f"FullyConnectedNet: normalization {normalization!r} is not valid",
                           "use None, 'batchnorm' or 'layernorm'")
        if not 0 < dropout_keep_ratio <= 1:
            raise RefError(f"FullyConnectedNet: dropout_keep_ratio={dropout_keep_ratio} is not in (0, 1]")
        r = _rng(seed)
        self.normalization, self.reg, self.dtype = normalization, reg, dtype
        self.input_dim = input_dim
        self.num_layers = len(hidden_dims) + 1
        dims = [input_dim, *hidden_dims, num_classes]
        self.params = {}
        for i in range(self.num_layers):
            std = np.sqrt(2.0 / dims[i]) if weight_scale == "he" else float(weight_scale)
            self.params[f"W{i + 1}"] = (std * r.standard_normal((dims[i], dims[i + 1]))).astype(dtype)
            self.params[f"b{i + 1}"] = np.zeros(dims[i + 1], dtype)
            if normalization and i < self.num_layers - 1:
                self.params[f"gamma{i + 1}"] = np.ones(dims[i + 1], dtype)
                self.params[f"beta{i + 1}"] = np.zeros(dims[i + 1], dtype)
        self.use_dropout = dropout_keep_ratio != 1
        self.dropout_param: dict[str, Any] = {"mode": "train", "p": dropout_keep_ratio}
        if seed is not None:
            self.dropout_param["seed"] = seed
        self.bn_params: list[dict[str, Any]] = [{"mode": "train"} for _ in range(self.num_layers - 1)]

    def set_mode(self, mode: str) -> None:
        self.dropout_param["mode"] = mode
        for bp in self.bn_params:
            bp["mode"] = mode

    def forward(self, X, train):  # noqa: N803
        _check_input("FullyConnectedNet", X, (self.input_dim,))
        X = X.astype(self.dtype, copy=False)  # noqa: N806
        self.set_mode("train" if train else "test")
        p, caches, h = self.params, [], X
        for i in range(1, self.num_layers):
            h, ca = affine_forward(h, p[f"W{i}"], p[f"b{i}"])
            cn = None
            if self.normalization == "batchnorm":
                h, cn = batchnorm_forward(h, p[f"gamma{i}"], p[f"beta{i}"], self.bn_params[i - 1])
            elif self.normalization == "layernorm":
                h, cn = layernorm_forward(h, p[f"gamma{i}"], p[f"beta{i}"], self.bn_params[i - 1])
            h, cr = relu_forward(h)
            cd = None
            if self.use_dropout:
                h, cd = dropout_forward(h, self.dropout_param)
            caches.append((ca, cn, cr, cd))
        last = self.num_layers
        scores, c_out = affine_forward(h, p[f"W{last}"], p[f"b{last}"])
        return scores, (caches, c_out)

    def backward(self, dscores, cache):
        caches, c_out = cache
        last = self.num_layers
        grads: dict[str, np.ndarray] = {}
        d, grads[f"W{last}"], grads[f"b{last}"] = affine_backward(dscores, c_out)
        for i in reversed(range(1, self.num_layers)):
            ca, cn, cr, cd = caches[i - 1]
            if cd is not None:
                d = dropout_backward(d, cd)
            d = relu_backward(d, cr)
            if self.normalization == "batchnorm":
                d, grads[f"gamma{i}"], grads[f"beta{i}"] = batchnorm_backward_alt(d, cn)
            elif self.normalization == "layernorm":
                d, grads[f"gamma{i}"], grads[f"beta{i}"] = layernorm_backward(d, cn)
            d, grads[f"W{i}"], grads[f"b{i}"] = affine_backward(d, ca)
        return d, grads


class ThreeLayerConvNet(RefModel):
    """conv (num_filters of filter_size, stride 1, 'same' padding) - relu - 2x2 max pool - affine (hidden_dim) -
    relu - affine - softmax. input_dim is (C, H, W) with even H and W; weights N(0, weight_scale^2), or He-scaled
    with weight_scale='he'."""

    def __init__(self, input_dim: tuple[int, int, int] = (3, 32, 32), num_filters: int = 32, filter_size: int = 7,
                 hidden_dim: int = 100, num_classes: int = 10, weight_scale: float | str = 1e-3, reg: float = 0.0,
                 dtype=np.float32, seed: int | None = 0):
        c, h, w = input_dim
        if filter_size % 2 == 0:
            raise RefError(f"ThreeLayerConvNet: filter_size={filter_size} must be odd for 'same' padding")
        if h % 2 or w % 2:
            raise RefError(f"ThreeLayerConvNet: input_dim {input_dim} needs an even height and width for the 2x2 pool")
        r = _rng(seed)
        self.input_dim, self.reg, self.dtype = tuple(input_dim), reg, dtype
        self.filter_size = filter_size
        shapes = {"W1": (num_filters, c, filter_size, filter_size), "W2": (num_filters * h * w // 4, hidden_dim),
                  "W3": (hidden_dim, num_classes)}
        self.params = {}
        for i, (name, shape) in enumerate(shapes.items()):
            fan_in = int(np.prod(shape[1:])) if i == 0 else shape[0]
            std = np.sqrt(2.0 / fan_in) if weight_scale == "he" else float(weight_scale)
            self.params[name] = (std * r.standard_normal(shape)).astype(dtype)
            self.params[f"b{i + 1}"] = np.zeros(shape[0] if i == 0 else shape[1], dtype)

    def forward(self, X, train):  # noqa: N803
        if not isinstance(X, np.ndarray) or X.ndim != 4 or tuple(X.shape[1:]) != self.input_dim:
            raise RefError(f"ThreeLayerConvNet.loss: X has shape {getattr(X, 'shape', None)}; expected (N, "
                           f"{', '.join(map(str, self.input_dim))})")
        X = X.astype(self.dtype, copy=False)  # noqa: N806
        p = self.params
        conv_param = {"stride": 1, "pad": (self.filter_size - 1) // 2}
        pool_param = {"pool_height": 2, "pool_width": 2, "stride": 2}
        a, c1 = conv_forward_fast(X, p["W1"], p["b1"], conv_param)
        a, c2 = relu_forward(a)
        a, c3 = max_pool_forward_fast(a, pool_param)
        a, c4 = affine_forward(a, p["W2"], p["b2"])
        a, c5 = relu_forward(a)
        scores, c6 = affine_forward(a, p["W3"], p["b3"])
        return scores, (c1, c2, c3, c4, c5, c6)

    def backward(self, dscores, cache):
        c1, c2, c3, c4, c5, c6 = cache
        grads: dict[str, np.ndarray] = {}
        d, grads["W3"], grads["b3"] = affine_backward(dscores, c6)
        d, grads["W2"], grads["b2"] = affine_backward(relu_backward(d, c5), c4)
        d = relu_backward(max_pool_backward_fast(d, c3), c2)
        dx, grads["W1"], grads["b1"] = conv_backward_fast(d, c1)
        return dx, grads
