"""Recurrent layers in NumPy: vanilla RNN and LSTM steps and sequences, word embeddings, a temporal affine layer
and the temporal softmax loss that captioning trains with.

Shapes: N sequences, T time steps, D input size, H hidden size, V vocabulary size, M outputs. The LSTM's 4H
pre-activation holds its gates in the order i, f, o, g (input, forget, output, candidate).
"""

from __future__ import annotations

import numpy as np

from ._check import Cache, RefError, array, cache_of, same
from .layers import sigmoid


def _rnn_shapes(fn: str, x: np.ndarray, h: np.ndarray, wx: np.ndarray, wh: np.ndarray, b: np.ndarray,
                gates: int) -> None:
    d = x.shape[-1]
    hid = h.shape[-1]
    same(fn, "Wx", array("Wx", wx, 2, fn).shape, (d, gates * hid), f"D={d} inputs to {gates} x H={hid}")
    same(fn, "Wh", array("Wh", wh, 2, fn).shape, (hid, gates * hid))
    same(fn, "b", array("b", b, 1, fn).shape, (gates * hid,))


def rnn_step_forward(x: np.ndarray, prev_h: np.ndarray, Wx: np.ndarray, Wh: np.ndarray,  # noqa: N803
                     b: np.ndarray) -> tuple[np.ndarray, Cache]:
    """One tanh step: next_h = tanh(x Wx + prev_h Wh + b). x (N, D), prev_h (N, H), Wx (D, H), Wh (H, H), b (H,)."""
    fn = "rnn_step_forward"
    array("x", x, 2, fn)
    same(fn, "prev_h", array("prev_h", prev_h, 2, fn).shape[:1], x.shape[:1], "one hidden state per example")
    _rnn_shapes(fn, x, prev_h, Wx, Wh, b, 1)
    next_h = np.tanh(x @ Wx + prev_h @ Wh + b)
    return next_h, Cache("rnn_step_forward", x, prev_h, Wx, Wh, next_h)


def rnn_step_backward(dnext_h: np.ndarray, cache: Cache):
    """dnext_h (N, H) -> dx (N, D), dprev_h (N, H), dWx (D, H), dWh (H, H), db (H,)."""
    x, prev_h, wx, wh, next_h = cache_of(cache, "rnn_step_forward", "rnn_step_backward")
    same("rnn_step_backward", "dnext_h", dnext_h.shape, next_h.shape)
    da = dnext_h * (1 - next_h * next_h)
    return da @ wx.T, da @ wh.T, x.T @ da, prev_h.T @ da, da.sum(0)


def _sequence(fn: str, x: np.ndarray, h0: np.ndarray, wx: np.ndarray, wh: np.ndarray, b: np.ndarray,
              gates: int) -> np.ndarray:
    """The checks of a whole-sequence forward pass, and its (N, T, H) output buffer."""
    n, t, _ = array("x", x, 3, fn).shape
    same(fn, "h0", array("h0", h0, 2, fn).shape[:1], (n,), "one initial state per sequence")
    _rnn_shapes(fn, x, h0, wx, wh, b, gates)
    return np.empty((n, t, h0.shape[1]), dtype=np.result_type(x, h0, wx))


def rnn_forward(x: np.ndarray, h0: np.ndarray, Wx: np.ndarray, Wh: np.ndarray,  # noqa: N803
                b: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (N, T, D), h0 (N, H) -> h (N, T, H), every hidden state."""
    h = _sequence("rnn_forward", x, h0, Wx, Wh, b, 1)
    t = h.shape[1]
    steps, prev = [], h0
    for i in range(t):
        prev, c = rnn_step_forward(x[:, i], prev, Wx, Wh, b)
        h[:, i] = prev
        steps.append(c)
    return h, Cache("rnn_forward", steps)


def rnn_backward(dh: np.ndarray, cache: Cache):
    """dh (N, T, H), the upstream gradient of every hidden state -> dx (N, T, D), dh0 (N, H), dWx, dWh, db."""
    (steps,) = cache_of(cache, "rnn_forward", "rnn_backward")
    x0, h0, wx, wh, _ = steps[0]
    same("rnn_backward", "dh", dh.shape, (h0.shape[0], len(steps), h0.shape[1]))
    dx = np.empty((x0.shape[0], len(steps), x0.shape[1]), dtype=dh.dtype)
    dwx, dwh, db = np.zeros_like(wx), np.zeros_like(wh), np.zeros(wh.shape[1], dtype=dh.dtype)
    dprev = np.zeros_like(h0, dtype=dh.dtype)
    for i in reversed(range(len(steps))):
        dx[:, i], dprev, a, bb, c = rnn_step_backward(dh[:, i] + dprev, steps[i])
        dwx += a
        dwh += bb
        db += c
    return dx, dprev, dwx, dwh, db


def lstm_step_forward(x: np.ndarray, prev_h: np.ndarray, prev_c: np.ndarray, Wx: np.ndarray,  # noqa: N803
                      Wh: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, Cache]:  # noqa: N803
    """One LSTM step. x (N, D), prev_h and prev_c (N, H), Wx (D, 4H), Wh (H, 4H), b (4H,) with the gates in the
    order i, f, o, g. Returns next_h, next_c (N, H) and the cache."""
    fn = "lstm_step_forward"
    array("x", x, 2, fn)
    same(fn, "prev_h", array("prev_h", prev_h, 2, fn).shape[:1], x.shape[:1], "one hidden state per example")
    same(fn, "prev_c", array("prev_c", prev_c, 2, fn).shape, prev_h.shape)
    _rnn_shapes(fn, x, prev_h, Wx, Wh, b, 4)
    hid = prev_h.shape[1]
    a = x @ Wx + prev_h @ Wh + b
    i, f, o = (sigmoid(a[:, k * hid:(k + 1) * hid]) for k in range(3))
    g = np.tanh(a[:, 3 * hid:])
    next_c = f * prev_c + i * g
    tc = np.tanh(next_c)
    next_h = o * tc
    return next_h, next_c, Cache("lstm_step_forward", x, prev_h, prev_c, Wx, Wh, i, f, o, g, tc)


def lstm_step_backward(dnext_h: np.ndarray, dnext_c: np.ndarray, cache: Cache):
    """dnext_h, dnext_c (N, H) -> dx (N, D), dprev_h, dprev_c (N, H), dWx (D, 4H), dWh (H, 4H), db (4H,)."""
    x, prev_h, prev_c, wx, wh, i, f, o, g, tc = cache_of(cache, "lstm_step_forward", "lstm_step_backward")
    same("lstm_step_backward", "dnext_h", dnext_h.shape, prev_h.shape)
    same("lstm_step_backward", "dnext_c", dnext_c.shape, prev_c.shape)
    dc = dnext_c + dnext_h * o * (1 - tc * tc)
    da = np.concatenate([dc * g * i * (1 - i), dc * prev_c * f * (1 - f), dnext_h * tc * o * (1 - o),
                         dc * i * (1 - g * g)], axis=1)
    return da @ wx.T, da @ wh.T, dc * f, x.T @ da, prev_h.T @ da, da.sum(0)


def lstm_forward(x: np.ndarray, h0: np.ndarray, Wx: np.ndarray, Wh: np.ndarray,  # noqa: N803
                 b: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (N, T, D), h0 (N, H); the cell state starts at zero. Returns h (N, T, H)."""
    h = _sequence("lstm_forward", x, h0, Wx, Wh, b, 4)
    t = h.shape[1]
    prev_h, prev_c, steps = h0, np.zeros_like(h0), []
    for k in range(t):
        prev_h, prev_c, c = lstm_step_forward(x[:, k], prev_h, prev_c, Wx, Wh, b)
        h[:, k] = prev_h
        steps.append(c)
    return h, Cache("lstm_forward", steps)


def lstm_backward(dh: np.ndarray, cache: Cache):
    """dh (N, T, H) -> dx (N, T, D), dh0 (N, H), dWx (D, 4H), dWh (H, 4H), db (4H,)."""
    (steps,) = cache_of(cache, "lstm_forward", "lstm_backward")
    x0, h0, _, wx, wh = steps[0][:5]
    same("lstm_backward", "dh", dh.shape, (h0.shape[0], len(steps), h0.shape[1]))
    dx = np.empty((x0.shape[0], len(steps), x0.shape[1]), dtype=dh.dtype)
    dwx, dwh, db = np.zeros_like(wx), np.zeros_like(wh), np.zeros(wx.shape[1], dtype=dh.dtype)
    dprev_h = np.zeros_like(h0, dtype=dh.dtype)
    dprev_c = np.zeros_like(h0, dtype=dh.dtype)
    for k in reversed(range(len(steps))):
        dx[:, k], dprev_h, dprev_c, a, bb, c = lstm_step_backward(dh[:, k] + dprev_h, dprev_c, steps[k])
        dwx += a
        dwh += bb
        db += c
    return dx, dprev_h, dwx, dwh, db


def word_embedding_forward(x: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, Cache]:  # noqa: N803
    """x (N, T) integer word indices in [0, V), W (V, D) -> out (N, T, D), the rows of W."""
    fn = "word_embedding_forward"
    array("x", x, 2, fn)
    array("W", W, 2, fn)
    if not np.issubdtype(x.dtype, np.integer):
        raise RefError(f"{fn}: x must hold integer word indices, got dtype {x.dtype}")
    if x.size and (x.min() < 0 or x.max() >= W.shape[0]):
        raise RefError(f"{fn}: word indices must lie in [0, {W.shape[0] - 1}] for W of shape {W.shape}, got "
                       f"{x.min()}..{x.max()}")
    return W[x], Cache("word_embedding_forward", x, W.shape)


def word_embedding_backward(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """dout (N, T, D) -> dW (V, D): each word's row gathers the gradients of its every use."""
    x, shape = cache_of(cache, "word_embedding_forward", "word_embedding_backward")
    same("word_embedding_backward", "dout", dout.shape, (*x.shape, shape[1]))
    dw = np.zeros(shape, dtype=dout.dtype)
    np.add.at(dw, x, dout)
    return dw


def temporal_affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (N, T, D), w (D, M), b (M,) -> out (N, T, M): the same affine map at every time step."""
    fn = "temporal_affine_forward"
    n, t, d = array("x", x, 3, fn).shape
    same(fn, "w", array("w", w, 2, fn).shape[:1], (d,), f"w must be ({d}, M)")
    same(fn, "b", array("b", b, 1, fn).shape, (w.shape[1],))
    return x @ w + b, Cache("temporal_affine_forward", x, w)


def temporal_affine_backward(dout: np.ndarray, cache: Cache):
    """dout (N, T, M) -> dx (N, T, D), dw (D, M), db (M,)."""
    x, w = cache_of(cache, "temporal_affine_forward", "temporal_affine_backward")
    same("temporal_affine_backward", "dout", dout.shape, (*x.shape[:2], w.shape[1]))
    return dout @ w.T, x.reshape(-1, x.shape[2]).T @ dout.reshape(-1, w.shape[1]), dout.sum((0, 1))


def temporal_softmax_loss(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[float, np.ndarray]:
    """x (N, T, V) scores, y (N, T) targets in [0, V), mask (N, T) booleans: the softmax cross-entropy summed over
    the time steps where mask is true and averaged over N. Returns (loss, dx (N, T, V))."""
    fn = "temporal_softmax_loss"
    n, t, v = array("x", x, 3, fn).shape
    same(fn, "y", array("y", y, 2, fn).shape, (n, t))
    same(fn, "mask", array("mask", mask, 2, fn).shape, (n, t))
    if y.size and (y.min() < 0 or y.max() >= v):
        raise RefError(f"{fn}: targets must lie in [0, {v - 1}], got {y.min()}..{y.max()}")
    flat, yf, mf = x.reshape(-1, v), y.reshape(-1), mask.reshape(-1).astype(x.dtype)
    shifted = flat - flat.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    rows = np.arange(len(yf))
    loss = -(mf * log_p[rows, yf]).sum() / n
    dx = np.exp(log_p)
    dx[rows, yf] -= 1
    dx *= mf[:, None] / n
    return float(loss), dx.reshape(n, t, v)
