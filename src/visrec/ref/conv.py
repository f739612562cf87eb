"""Convolution and max pooling in NumPy: naive loops that read like the definition, and fast versions.

The fast convolution builds a strided view of every receptive field (im2col without copying the padded input
more than once) and contracts it with the filters in one `tensordot`; its backward pass scatters the columns
back with one slice-add per filter offset. The fast pooling reshapes when the windows tile the input and uses
a strided view otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._check import Cache, RefError, array, cache_of, same


def _conv_setup(fn: str, x: np.ndarray, w: np.ndarray, b: np.ndarray,
                conv_param: dict[str, Any]) -> tuple[int, int, int, int]:
    n, c, h, wd = array("x", x, 4, fn).shape
    f, cw, hh, ww = array("w", w, 4, fn).shape
    if cw != c:
        raise RefError(f"{fn}: w has shape {w.shape} with {cw} input channels, but x {x.shape} has {c}; expected w of "
                       f"shape (F, {c}, HH, WW)")
    same(fn, "b", array("b", b, 1, fn).shape, (f,), "one bias per filter")
    stride, pad = conv_param.get("stride", 1), conv_param.get("pad", 0)
    if not isinstance(stride, int | np.integer) or stride < 1:
        raise RefError(f"{fn}: conv_param['stride']={stride!r} is not valid", "use an integer >= 1")
    if not isinstance(pad, int | np.integer) or pad < 0:
        raise RefError(f"{fn}: conv_param['pad']={pad!r} is not valid", "use an integer >= 0")
    for name, size, k in (("height", h, hh), ("width", wd, ww)):
        span = size + 2 * pad - k
        if span < 0 or span % stride:
            raise RefError(f"{fn}: stride {stride} does not tile the padded input: {name} {size} + 2 * pad {pad} - "
                           f"filter {k} = {span}, not a multiple of the stride",
                           "change pad or stride so that (size + 2 * pad - filter) is a multiple of the stride")
    return stride, pad, 1 + (h + 2 * pad - hh) // stride, 1 + (wd + 2 * pad - ww) // stride


def conv_forward_naive(x: np.ndarray, w: np.ndarray, b: np.ndarray,
                       conv_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W), w (F, C, HH, WW), b (F,); conv_param: stride, pad (zeros on every side).
    out (N, F, H', W') with H' = 1 + (H + 2 pad - HH) / stride, W' likewise; the stride must tile exactly."""
    stride, pad, ho, wo = _conv_setup("conv_forward_naive", x, w, b, conv_param)
    n, f = x.shape[0], w.shape[0]
    hh, ww = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, f, ho, wo), dtype=np.result_type(x, w))
    for i in range(n):
        for k in range(f):
            for r in range(ho):
                for s in range(wo):
                    field = xp[i, :, r * stride:r * stride + hh, s * stride:s * stride + ww]
                    out[i, k, r, s] = np.sum(field * w[k]) + b[k]
    return out, Cache("conv_forward_naive", x, w, b, conv_param)


def conv_backward_naive(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (N, F, H', W') -> dx (N, C, H, W), dw (F, C, HH, WW), db (F,)."""
    x, w, b, conv_param = cache_of(cache, "conv_forward_naive", "conv_backward_naive")
    stride, pad, ho, wo = _conv_setup("conv_backward_naive", x, w, b, conv_param)
    same("conv_backward_naive", "dout", dout.shape, (x.shape[0], w.shape[0], ho, wo))
    hh, ww = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(x.shape[0]):
        for k in range(w.shape[0]):
            for r in range(ho):
                for s in range(wo):
                    g = dout[i, k, r, s]
                    rs, cs = slice(r * stride, r * stride + hh), slice(s * stride, s * stride + ww)
                    dw[k] += g * xp[i, :, rs, cs]
                    dxp[i, :, rs, cs] += g * w[k]
    dx = dxp[:, :, pad:pad + x.shape[2], pad:pad + x.shape[3]]
    return dx, dw, dout.sum((0, 2, 3))


def _fields(xp: np.ndarray, hh: int, ww: int, stride: int, ho: int, wo: int) -> np.ndarray:
    """A read-only view (N, C, HH, WW, H', W') of every receptive field of the padded input."""
    n, c = xp.shape[:2]
    sn, sc, sh, sw = xp.strides
    return as_strided(xp, (n, c, hh, ww, ho, wo), (sn, sc, sh, sw, sh * stride, sw * stride), writeable=False)


def conv_forward_fast(x: np.ndarray, w: np.ndarray, b: np.ndarray,
                      conv_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """conv_forward_naive's result, computed as one contraction of the receptive fields with the filters."""
    stride, pad, ho, wo = _conv_setup("conv_forward_fast", x, w, b, conv_param)
    hh, ww = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else np.ascontiguousarray(x)
    fields = _fields(xp, hh, ww, stride, ho, wo)
    cols = np.ascontiguousarray(fields.transpose(0, 4, 5, 1, 2, 3)).reshape(-1, w[0].size)  # (N H' W', C HH WW)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    out = out.reshape(x.shape[0], ho, wo, -1).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out), Cache("conv_forward_fast", x, w, b, conv_param, cols)


def conv_backward_fast(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """conv_backward_naive's gradients: dw from the cached columns, dx by adding each filter offset's
    contribution back into the padded input (HH * WW strided slice-adds)."""
    x, w, b, conv_param, cols = cache_of(cache, "conv_forward_fast", "conv_backward_fast")
    stride, pad, ho, wo = _conv_setup("conv_backward_fast", x, w, b, conv_param)
    n, c, h, wd = x.shape
    f, _, hh, ww = w.shape
    same("conv_backward_fast", "dout", dout.shape, (n, f, ho, wo))
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, f)  # (N H' W', F)
    dw = (d2.T @ cols).reshape(w.shape)
    dcols = (d2 @ w.reshape(f, -1)).reshape(n, ho, wo, c, hh, ww)
    dxp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad), dtype=dcols.dtype)
    for i in range(hh):
        for j in range(ww):
            dxp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += \
                dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, pad:pad + h, pad:pad + wd], dw, dout.sum((0, 2, 3))


# ---------------------------------------------------------------------------------------------- pooling


def _pool_setup(fn: str, x: np.ndarray, pool_param: dict[str, Any]) -> tuple[int, int, int, int, int]:
    n, c, h, w = array("x", x, 4, fn).shape
    ph, pw, s = pool_param.get("pool_height", 2), pool_param.get("pool_width", 2), pool_param.get("stride", 2)
    for name, v in (("pool_height", ph), ("pool_width", pw), ("stride", s)):
        if not isinstance(v, int | np.integer) or v < 1:
            raise RefError(f"{fn}: pool_param['{name}']={v!r} is not valid", "use an integer >= 1")
    for name, size, k in (("height", h, ph), ("width", w, pw)):
        if size < k or (size - k) % s:
            raise RefError(f"{fn}: stride {s} does not tile the input: {name} {size} - pool {k} = {size - k}, not a "
                           "multiple of the stride", "choose pool sizes and stride that tile the input")
    return ph, pw, s, 1 + (h - ph) // s, 1 + (w - pw) // s


def max_pool_forward_naive(x: np.ndarray, pool_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W); pool_param: pool_height, pool_width, stride (no padding).
    out (N, C, H', W') with H' = 1 + (H - pool_height) / stride."""
    ph, pw, s, ho, wo = _pool_setup("max_pool_forward_naive", x, pool_param)
    out = np.empty((*x.shape[:2], ho, wo), dtype=x.dtype)
    for r in range(ho):
        for q in range(wo):
            out[:, :, r, q] = x[:, :, r * s:r * s + ph, q * s:q * s + pw].max((2, 3))
    return out, Cache("max_pool_forward_naive", x, pool_param)


def max_pool_backward_naive(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """dout (N, C, H', W') -> dx (N, C, H, W): each window's gradient goes to its (first) maximum."""
    x, pool_param = cache_of(cache, "max_pool_forward_naive", "max_pool_backward_naive")
    ph, pw, s, ho, wo = _pool_setup("max_pool_backward_naive", x, pool_param)
    same("max_pool_backward_naive", "dout", dout.shape, (*x.shape[:2], ho, wo))
    dx = np.zeros_like(x)
    n, c = x.shape[:2]
    for i in range(n):
        for k in range(c):
            for r in range(ho):
                for q in range(wo):
                    win = x[i, k, r * s:r * s + ph, q * s:q * s + pw]
                    a, bb = np.unravel_index(np.argmax(win), win.shape)
                    dx[i, k, r * s + a, q * s + bb] += dout[i, k, r, q]
    return dx


def max_pool_forward_fast(x: np.ndarray, pool_param: dict[str, Any]) -> tuple[np.ndarray, Cache]:
    """max_pool_forward_naive's result: a reshape when the windows tile the input (pool = stride), a strided view
    of the windows otherwise."""
    ph, pw, s, ho, wo = _pool_setup("max_pool_forward_fast", x, pool_param)
    n, c, h, w = x.shape
    xc = np.ascontiguousarray(x)
    sn, sc, sh, sw = xc.strides
    win = as_strided(xc, (n, c, ho, wo, ph, pw), (sn, sc, sh * s, sw * s, sh, sw), writeable=False)
    flat = win.reshape(n, c, ho, wo, ph * pw)
    arg = flat.argmax(-1)  # the first maximum, as the naive pass picks it
    out = np.take_along_axis(flat, arg[..., None], -1)[..., 0]
    return out, Cache("max_pool_forward_fast", x.shape, pool_param, arg)


def max_pool_backward_fast(dout: np.ndarray, cache: Cache) -> np.ndarray:
    """max_pool_backward_naive's result: the gradient scattered to the remembered maxima in one indexed add."""
    shape, pool_param, arg = cache_of(cache, "max_pool_forward_fast", "max_pool_backward_fast")
    n, c, h, w = shape
    ph, pw, s, ho, wo = _pool_setup("max_pool_backward_fast", np.empty(shape, dtype=np.uint8), pool_param)
    same("max_pool_backward_fast", "dout", dout.shape, (n, c, ho, wo))
    rows = (np.arange(ho) * s)[:, None] + arg // pw  # (N, C, H', W') via broadcasting
    cols = (np.arange(wo) * s)[None, :] + arg % pw
    dx = np.zeros(shape, dtype=dout.dtype)
    if ph <= s and pw <= s:  # windows do not overlap: every target is distinct
        ni, ci = np.indices((n, c))
        dx[ni[..., None, None], ci[..., None, None], rows, cols] = dout
    else:
        ni, ci = np.indices((n, c))
        np.add.at(dx, (np.broadcast_to(ni[..., None, None], arg.shape), np.broadcast_to(ci[..., None, None], arg.shape),
                       rows, cols), dout)
    return dx
