"""Numerical gradients by centred differences, and the relative error the course compares them with.

    f = lambda x: softmax_loss(x, y)[0]
    num = eval_numerical_gradient(f, x)
    rel_error(num, dx)   # below 1e-7 is right in float64; 1e-2 and up is a bug
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def rel_error(x: np.ndarray, y: np.ndarray) -> float:
    """max |x - y| / max(1e-8, |x| + |y|), elementwise, as one number."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"rel_error: shapes differ, {x.shape} and {y.shape}")
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y)))) if x.size else 0.0


def _centred(f: Callable[[np.ndarray], Any], x: np.ndarray, h: float, reduce: Callable[[Any, Any], float],
             verbose: bool = False) -> np.ndarray:
    """For each coordinate i of x (changed in place and restored): reduce(f(x + h e_i), f(x - h e_i)) / 2h."""
    grad = np.zeros_like(x, dtype=np.float64)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    while not it.finished:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        plus = f(x)
        x[i] = old - h
        minus = f(x)
        x[i] = old
        grad[i] = reduce(plus, minus) / (2 * h)
        if verbose:
            print(i, grad[i])
        it.iternext()
    return grad


def eval_numerical_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, verbose: bool = False,
                            h: float = 1e-5) -> np.ndarray:
    """The gradient of a scalar function f at x (changed in place and restored), one coordinate at a time:
    (f(x + h) - f(x - h)) / 2h."""
    return _centred(f, x, h, lambda plus, minus: plus - minus, verbose)


def eval_numerical_gradient_array(f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, df: np.ndarray,
                                  h: float = 1e-5) -> np.ndarray:
    """The gradient of sum(f(x) * df) at x, for an array-valued f and an upstream gradient df."""
    def copy(v: np.ndarray) -> np.ndarray:
        return np.array(v, dtype=np.float64, copy=True)

    return _centred(lambda z: copy(f(z)), x, h, lambda plus, minus: float(np.sum((plus - minus) * df)))
