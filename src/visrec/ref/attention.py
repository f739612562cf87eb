"""Attention in NumPy: scaled dot-product attention and multi-head attention, forward and backward.

Shapes: N sequences, Tq queries, Tk keys, D the query/key size, Dv the value size, E the model width split into
num_heads heads of E / num_heads. A mask is boolean, True where a query may attend to a key: (Tq, Tk), or
(N, Tq, Tk) per sequence; a causal mask is `np.tril(np.ones((T, T), bool))`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._check import Cache, RefError, array, cache_of, same


def _softmax_last(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                      mask: np.ndarray | None = None) -> tuple[np.ndarray, Cache]:
    """softmax(q k^T / sqrt(D)) v. q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) with the same leading axes;
    mask broadcastable to (..., Tq, Tk), True where attention is allowed (every query needs one key).
    Returns out (..., Tq, Dv); the cache holds the attention weights as its second item."""
    fn = "attention_forward"
    array("q", q, fn=fn)
    if q.ndim < 2:
        raise RefError(f"{fn}: q has shape {q.shape}; expected (..., Tq, D)")
    same(fn, "k", array("k", k, q.ndim, fn).shape[:-2] + k.shape[-1:], q.shape[:-2] + q.shape[-1:],
         "k must be (..., Tk, D) with q's leading axes and D")
    same(fn, "v", array("v", v, q.ndim, fn).shape[:-1], k.shape[:-1], "v must be (..., Tk, Dv) like k")
    scale = 1.0 / np.sqrt(q.shape[-1])
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise RefError(f"{fn}: mask must be boolean (True = may attend), got dtype {mask.dtype}")
        try:
            full = np.broadcast_to(mask, s.shape)
        except ValueError:
            raise RefError(f"{fn}: mask of shape {mask.shape} does not fit the scores' shape {s.shape} "
                           "(..., Tq, Tk)") from None
        if not full.any(-1).all():
            raise RefError(f"{fn}: the mask leaves a query with no key to attend to")
        s = np.where(full, s, -np.inf)
    a = _softmax_last(s)
    return a @ v, Cache("attention_forward", a, q, k, v, scale)


def attention_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout (..., Tq, Dv) -> dq, dk, dv."""
    a, q, k, v, scale = cache_of(cache, "attention_forward", "attention_backward")
    same("attention_backward", "dout", dout.shape, a.shape[:-1] + v.shape[-1:])
    dv = np.swapaxes(a, -1, -2) @ dout
    da = dout @ np.swapaxes(v, -1, -2)
    ds = a * (da - (da * a).sum(-1, keepdims=True)) * scale  # masked entries have a = 0: no gradient
    return ds @ k, np.swapaxes(ds, -1, -2) @ q, dv


def init_multihead_params(embed_dim: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Wq, Wk, Wv, Wo (E, E) drawn with std 1/sqrt(E), and zero biases bq, bk, bv, bo (E,)."""
    rng = rng or np.random.default_rng(0)
    p = {}
    for n in "qkvo":
        p[f"W{n}"] = rng.standard_normal((embed_dim, embed_dim)) / np.sqrt(embed_dim)
        p[f"b{n}"] = np.zeros(embed_dim)
    return p


def multihead_attention_forward(query: np.ndarray, key: np.ndarray, value: np.ndarray, params: dict[str, Any],
                                num_heads: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, Cache]:
    """Multi-head attention: project query (N, Tq, E), key and value (N, Tk, E) with x @ W + b, split E into
    num_heads heads, attend in each (mask as attention_forward's), join the heads and project with Wo, bo.
    Returns out (N, Tq, E)."""
    fn = "multihead_attention_forward"
    n, tq, e = array("query", query, 3, fn).shape
    same(fn, "key", array("key", key, 3, fn).shape[::2], (n, e), "key must be (N, Tk, E)")
    same(fn, "value", array("value", value, 3, fn).shape, key.shape)
    if not isinstance(num_heads, int | np.integer) or num_heads < 1 or e % num_heads:
        raise RefError(f"{fn}: num_heads={num_heads} does not divide the embedding size E={e}",
                       f"use a num_heads that divides {e}")
    for name in ("Wq", "Wk", "Wv", "Wo"):
        same(fn, f"params['{name}']", array(name, params.get(name), 2, fn).shape, (e, e))
    for name in ("bq", "bk", "bv", "bo"):
        same(fn, f"params['{name}']", array(name, params.get(name), 1, fn).shape, (e,))
    h = num_heads

    def split(x):  # (N, T, E) -> (N, h, T, E/h)
        return x.reshape(x.shape[0], x.shape[1], h, e // h).transpose(0, 2, 1, 3)

    qp = split(query @ params["Wq"] + params["bq"])
    kp = split(key @ params["Wk"] + params["bk"])
    vp = split(value @ params["Wv"] + params["bv"])
    m = None if mask is None else (np.asarray(mask)[:, None] if np.ndim(mask) == 3 else mask)
    heads, att = attention_forward(qp, kp, vp, m)
    joined = heads.transpose(0, 2, 1, 3).reshape(n, tq, e)
    out = joined @ params["Wo"] + params["bo"]
    return out, Cache("multihead_attention_forward", query, key, value, params, h, att, joined)


def multihead_attention_backward(dout: np.ndarray, cache: Cache):
    """dout (N, Tq, E) -> dquery, dkey, dvalue and grads, a dict with the gradient of every parameter."""
    query, key, value, p, h, att, joined = cache_of(cache, "multihead_attention_forward",
                                                     "multihead_attention_backward")
    same("multihead_attention_backward", "dout", dout.shape, query.shape)
    n, tq, e = query.shape
    grads = {"Wo": joined.reshape(-1, e).T @ dout.reshape(-1, e), "bo": dout.sum((0, 1))}
    dheads = (dout @ p["Wo"].T).reshape(n, tq, h, e // h).transpose(0, 2, 1, 3)
    dq, dk, dv = attention_backward(dheads, att)

    def join(d):  # (N, h, T, E/h) -> (N, T, E)
        return d.transpose(0, 2, 1, 3).reshape(d.shape[0], d.shape[2], e)

    out = []
    for name, x, d in (("q", query, join(dq)), ("k", key, join(dk)), ("v", value, join(dv))):
        grads[f"W{name}"] = x.reshape(-1, e).T @ d.reshape(-1, e)
        grads[f"b{name}"] = d.sum((0, 1))
        out.append(d @ p[f"W{name}"].T)
    return out[0], out[1], out[2], grads
