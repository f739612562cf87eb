"""Fully connected layers, activations, dropout, normalization and the classification losses, in NumPy.

Each layer is a pair: `*_forward(...) -> (out, cache)` and `*_backward(dout, cache) -> gradients`, with the
course's calling conventions. Shapes: N examples, D input features, M outputs, C channels, H x W images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._check import Cache, RefError, array, cache_of, mode_of, same

# ---------------------------------------------------------------------------------------------- affine


def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (N, d_1, ..., d_k), each example flattened to D = d_1 * ... * d_k values; w (D, M); b (M,).
    Returns out (N, M) = x.reshape(N, D) @ w + b."""
    array("x", x, fn="affine_forward")
    array("w", w, 2, "affine_forward")
    n = x.shape[0]
    d = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    if w.shape[0] != d:
        raise RefError(f"affine_forward: x of shape {x.shape} has {d} values per example, but w has shape {w.shape}; "
                       f"expected w of shape ({d}, M)")
    same("affine_forward", "b", array("b", b, 1, "affine_forward").shape, (w.shape[1],), "one bias per output")
    out = x.reshape(n, d) @ w + b
    return out, Cache("affine_forward", x, w, b)


def affine_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, M) -> dx (shaped like x), dw (D, M), db (M,)."""
    x, w, _ = cache_of(cache, "affine_forward", "affine_backward")
    same("affine_backward", "dout", dout.shape, (x.shape[0], w.shape[1]))
    x2 = x.reshape(x.shape[0], -1)
    return (dout @ w.T).reshape(x.shape), x2.T @ dout, dout.sum(0)


# ---------------------------------------------------------------------------------------------- activations


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """max(0, x), any shape."""
    array("x", x, fn="relu_forward")
    return np.maximum(x, 0), Cache("relu_forward", x)


def relu_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """dout (shaped like x) -> dx: dout where x > 0, else 0."""
    (x,) = cache_of(cache, "relu_forward", "relu_backward")
    same("relu_backward", "dout", dout.shape, x.shape)
    return dout * (x > 0)


def leaky_relu_forward(x: np.ndarray, alpha: float = 0.01) -> tuple[np.ndarray, Cache]:
    """x where x > 0, alpha * x elsewhere; any shape."""
    array("x", x, fn="leaky_relu_forward")
    return np.where(x > 0, x, alpha * x), Cache("leaky_relu_forward", x, alpha)


def leaky_relu_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """dout (shaped like x) -> dx: dout where x > 0, alpha * dout elsewhere."""
    x, alpha = cache_of(cache, "leaky_relu_forward", "leaky_relu_backward")
    same("leaky_relu_backward", "dout", dout.shape, x.shape)
    return np.where(x > 0, dout, alpha * dout)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    pos = x >= 0
    z = np.exp(np.where(pos, -x, x))
    return np.where(pos, 1 / (1 + z), z / (1 + z))


def sigmoid_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """sigmoid(x), any shape; the cache keeps the output."""
    array("x", x, fn="sigmoid_forward")
    out = sigmoid(x)
    return out, Cache("sigmoid_forward", out)


def sigmoid_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """dout (shaped like x) -> dx = dout * s * (1 - s), s the forward output."""
    (out,) = cache_of(cache, "sigmoid_forward", "sigmoid_backward")
    same("sigmoid_backward", "dout", dout.shape, out.shape)
    return dout * out * (1 - out)


def tanh_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """tanh(x), any shape; the cache keeps the output."""
    array("x", x, fn="tanh_forward")
    out = np.tanh(x)
    return out, Cache("tanh_forward", out)


def tanh_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """dout (shaped like x) -> dx = dout * (1 - t^2), t the forward output."""
    (out,) = cache_of(cache, "tanh_forward", "tanh_backward")
    same("tanh_backward", "dout", dout.shape, out.shape)
    return dout * (1 - out * out)


# ---------------------------------------------------------------------------------------------- dropout


def dropout_forward(x: np.ndarray, dropout_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """Inverted dropout. dropout_param: p, the probability of KEEPING a unit (0 < p <= 1); mode 'train' or 'test';
    seed (optional) for a reproducible mask. In training each unit is kept with probability p and scaled by 1/p,
    so test mode is the identity."""
    array("x", x, fn="dropout_forward")
    p = dropout_param.get("p")
    if not isinstance(p, int | float) or not 0 < p <= 1:
        raise RefError(f"dropout_forward: p={p!r} is not valid", "p is the probability of keeping a unit, in (0, 1]")
    mode = mode_of("dropout_forward", dropout_param)
    if mode == "test":
        return x.copy(), Cache("dropout_forward", dropout_param, None)
    seed = dropout_param.get("seed")
    u = np.random.default_rng(seed).random(x.shape) if seed is not None else np.random.random(x.shape)
    mask = (u < p).astype(x.dtype) / p
    return x * mask, Cache("dropout_forward", dropout_param, mask)


def dropout_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """dout (shaped like x) -> dx: dout times the training mask (kept units scaled by 1/p); dout in test mode."""
    _, mask = cache_of(cache, "dropout_forward", "dropout_backward")
    if mask is None:
        return dout.copy()
    same("dropout_backward", "dout", dout.shape, mask.shape)
    return dout * mask


# ---------------------------------------------------------------------------------------------- normalization


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      bn_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """x (N, D); gamma, beta (D,). bn_param: mode ('train'/'test'), eps (1e-5), momentum (0.9), running_mean and
    running_var (D,), created at zeros and ones when missing and updated in place in training as
    `running = momentum * running + (1 - momentum) * batch`. Training normalizes with the batch mean and the
    biased batch variance; test mode with the running statistics."""
    fn = "batchnorm_forward"
    n, d = array("x", x, 2, fn).shape
    same(fn, "gamma", array("gamma", gamma, 1, fn).shape, (d,))
    same(fn, "beta", array("beta", beta, 1, fn).shape, (d,))
    mode = mode_of(fn, bn_param)
    eps, momentum = bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9)
    rm = bn_param.setdefault("running_mean", np.zeros(d, dtype=x.dtype))
    rv = bn_param.setdefault("running_var", np.ones(d, dtype=x.dtype))
    same(fn, "bn_param['running_mean']", rm.shape, (d,))
    if mode == "test":
        inv = 1.0 / np.sqrt(rv + eps)
        xhat = (x - rm) * inv
        return gamma * xhat + beta, Cache("batchnorm_forward", "test", xhat, gamma, inv, None)
    mu = x.mean(0)
    xc = x - mu
    var = (xc * xc).mean(0)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = xc * inv
    bn_param["running_mean"] = momentum * rm + (1 - momentum) * mu
    bn_param["running_var"] = momentum * rv + (1 - momentum) * var
    return gamma * xhat + beta, Cache("batchnorm_forward", "train", xhat, gamma, inv, xc)


def batchnorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, D) -> dx (N, D), dgamma (D,), dbeta (D,), through the computational graph step by step."""
    mode, xhat, gamma, inv, xc = cache_of(cache, "batchnorm_forward", "batchnorm_backward")
    same("batchnorm_backward", "dout", dout.shape, xhat.shape)
    if mode == "test":  # the running statistics are constants
        return dout * gamma * inv, (dout * xhat).sum(0), dout.sum(0)
    n = dout.shape[0]
    dbeta = dout.sum(0)
    dgamma = (dout * xhat).sum(0)
    dxhat = dout * gamma
    dinv = (dxhat * xc).sum(0)
    dvar = dinv * -0.5 * inv**3  # inv = (var + eps)^-1/2
    dxc = dxhat * inv + dvar * 2 * xc / n
    dmu = -dxc.sum(0)
    return dxc + dmu / n, dgamma, dbeta


def batchnorm_backward_alt(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same gradients from the simplified closed form dx = gamma * inv / N * (N dout - sum(dout) - xhat *
    sum(dout * xhat)) (training mode)."""
    mode, xhat, gamma, inv, _ = cache_of(cache, "batchnorm_forward", "batchnorm_backward_alt")
    if mode == "test":
        return batchnorm_backward(dout, cache)
    same("batchnorm_backward_alt", "dout", dout.shape, xhat.shape)
    n = dout.shape[0]
    dbeta = dout.sum(0)
    dgamma = (dout * xhat).sum(0)
    dx = gamma * inv / n * (n * dout - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


def layernorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                      ln_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """x (N, D) normalized per example over its D features (the same in training and test); gamma, beta (D,);
    ln_param: eps (1e-5)."""
    fn = "layernorm_forward"
    n, d = array("x", x, 2, fn).shape
    same(fn, "gamma", array("gamma", gamma, 1, fn).shape, (d,))
    same(fn, "beta", array("beta", beta, 1, fn).shape, (d,))
    eps = ln_param.get("eps", 1e-5)
    mu = x.mean(1, keepdims=True)
    xc = x - mu
    inv = 1.0 / np.sqrt((xc * xc).mean(1, keepdims=True) + eps)
    xhat = xc * inv
    return gamma * xhat + beta, Cache("layernorm_forward", xhat, gamma, inv)


def layernorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, D) -> dx (N, D), dgamma (D,), dbeta (D,)."""
    xhat, gamma, inv = cache_of(cache, "layernorm_forward", "layernorm_backward")
    same("layernorm_backward", "dout", dout.shape, xhat.shape)
    d = dout.shape[1]
    dxhat = dout * gamma
    dx = inv / d * (d * dxhat - dxhat.sum(1, keepdims=True) - xhat * (dxhat * xhat).sum(1, keepdims=True))
    return dx, (dout * xhat).sum(0), dout.sum(0)


def spatial_batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                              bn_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W): batch norm per channel over N, H and W; gamma, beta (C,); bn_param as batchnorm's."""
    fn = "spatial_batchnorm_forward"
    n, c, h, w = array("x", x, 4, fn).shape
    same(fn, "gamma", array("gamma", gamma, 1, fn).shape, (c,))
    flat = x.transpose(0, 2, 3, 1).reshape(-1, c)
    out, inner = batchnorm_forward(flat, gamma, beta, bn_param)
    return out.reshape(n, h, w, c).transpose(0, 3, 1, 2), Cache("spatial_batchnorm_forward", inner, x.shape)


def spatial_batchnorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, C, H, W) -> dx (N, C, H, W), dgamma (C,), dbeta (C,)."""
    inner, shape = cache_of(cache, "spatial_batchnorm_forward", "spatial_batchnorm_backward")
    same("spatial_batchnorm_backward", "dout", dout.shape, shape)
    n, c, h, w = shape
    dx, dgamma, dbeta = batchnorm_backward_alt(dout.transpose(0, 2, 3, 1).reshape(-1, c), inner)
    return dx.reshape(n, h, w, c).transpose(0, 3, 1, 2), dgamma, dbeta


def spatial_groupnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, G: int,  # noqa: N803
                              gn_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W) normalized per example over each of G groups of C/G channels; gamma, beta (1, C, 1, 1);
    gn_param: eps (1e-5). G must divide C."""
    fn = "spatial_groupnorm_forward"
    n, c, h, w = array("x", x, 4, fn).shape
    if not isinstance(G, int | np.integer) or G < 1 or c % G:
        raise RefError(f"{fn}: G={G} does not divide the {c} channels of x {x.shape} into equal groups",
                       f"use a G that divides {c}: {', '.join(str(g) for g in range(1, c + 1) if c % g == 0)}")
    same(fn, "gamma", array("gamma", gamma, 4, fn).shape, (1, c, 1, 1))
    same(fn, "beta", array("beta", beta, 4, fn).shape, (1, c, 1, 1))
    eps = gn_param.get("eps", 1e-5)
    g = x.reshape(n, G, -1)
    xc = g - g.mean(2, keepdims=True)
    inv = 1.0 / np.sqrt((xc * xc).mean(2, keepdims=True) + eps)
    xhat = (xc * inv).reshape(x.shape)
    return gamma * xhat + beta, Cache("spatial_groupnorm_forward", xhat, gamma, inv, G)


def spatial_groupnorm_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, C, H, W) -> dx (N, C, H, W), dgamma and dbeta (1, C, 1, 1)."""
    xhat, gamma, inv, G = cache_of(cache, "spatial_groupnorm_forward", "spatial_groupnorm_backward")  # noqa: N806
    same("spatial_groupnorm_backward", "dout", dout.shape, xhat.shape)
    n = dout.shape[0]
    dgamma = (dout * xhat).sum((0, 2, 3), keepdims=True)
    dbeta = dout.sum((0, 2, 3), keepdims=True)
    dxhat = (dout * gamma).reshape(n, G, -1)
    xh = xhat.reshape(n, G, -1)
    m = xh.shape[2]
    dx = inv / m * (m * dxhat - dxhat.sum(2, keepdims=True) - xh * (dxhat * xh).sum(2, keepdims=True))
    return dx.reshape(dout.shape), dgamma, dbeta


# ---------------------------------------------------------------------------------------------- losses


def _scores_labels(fn: str, x: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    n, c = array("x", x, 2, fn).shape
    same(fn, "y", array("y", y, 1, fn).shape, (n,), "one label per row of x")
    if n and (y.min() < 0 or y.max() >= c):
        raise RefError(f"{fn}: labels must lie in [0, {c - 1}] for x of shape {x.shape}, got {y.min()}..{y.max()}")
    return n, c


def svm_loss(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Multiclass SVM (hinge) loss with margin 1: for each example the sum over the wrong classes j of
    max(0, x_j - x_y + 1), averaged over N. x (N, C) scores, y (N,) labels. Returns (loss, dx (N, C))."""
    n, _ = _scores_labels("svm_loss", x, y)
    rows = np.arange(n)
    margins = np.maximum(0, x - x[rows, y][:, None] + 1.0)
    margins[rows, y] = 0
    loss = margins.sum() / n
    pos = (margins > 0).astype(x.dtype)
    pos[rows, y] = -pos.sum(1)
    return float(loss), pos / n


def softmax_loss(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Cross-entropy of softmax(x) against y, averaged over N. x (N, C) scores, y (N,) labels.
    Returns (loss, dx (N, C))."""
    n, _ = _scores_labels("softmax_loss", x, y)
    shifted = x - x.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    rows = np.arange(n)
    loss = -log_p[rows, y].sum() / n
    dx = np.exp(log_p)
    dx[rows, y] -= 1
    return float(loss), dx / n
