"""Update rules, each `rule(w, dw, config) -> (next_w, config)`; config carries the hyperparameters and the rule's
state (velocity, moments) between calls, and gets its defaults on the first call.

- sgd:          w -= learning_rate * dw
- sgd_momentum: v = momentum * v - learning_rate * dw; w += v
- sgd_nesterov: v_prev = v; v = momentum * v - learning_rate * dw; w += -momentum * v_prev + (1 + momentum) * v
- rmsprop:      cache = decay_rate * cache + (1 - decay_rate) * dw^2; w -= learning_rate * dw / (sqrt(cache) + eps)
- adam:         bias-corrected first and second moments (Kingma and Ba), t counted from 1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ._check import RefError

Config = dict[str, Any]


def _check(fn: str, w: np.ndarray, dw: np.ndarray) -> None:
    if not isinstance(w, np.ndarray) or not isinstance(dw, np.ndarray) or w.shape != dw.shape:
        raise RefError(f"{fn}: w and dw must be NumPy arrays of one shape, got "
                       f"{getattr(w, 'shape', type(w).__name__)} and {getattr(dw, 'shape', type(dw).__name__)}")


def sgd(w: np.ndarray, dw: np.ndarray, config: Config | None = None) -> tuple[np.ndarray, Config]:
    """config: learning_rate (1e-2)."""
    _check("sgd", w, dw)
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    return w - config["learning_rate"] * dw, config


def _momentum_step(fn: str, w: np.ndarray, dw: np.ndarray, config: Config | None) -> tuple[np.ndarray, np.ndarray,
                                                                                           Config]:
    """(previous velocity, new velocity, config) with the momentum rules' defaults set."""
    _check(fn, w, dw)
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    v_prev = config.get("velocity")
    v_prev = np.zeros_like(w) if v_prev is None else v_prev
    config["velocity"] = config["momentum"] * v_prev - config["learning_rate"] * dw
    return v_prev, config["velocity"], config


def sgd_momentum(w: np.ndarray, dw: np.ndarray, config: Config | None = None) -> tuple[np.ndarray, Config]:
    """config: learning_rate (1e-2), momentum (0.9), velocity (zeros like w)."""
    _, v, config = _momentum_step("sgd_momentum", w, dw, config)
    return w + v, config


def sgd_nesterov(w: np.ndarray, dw: np.ndarray, config: Config | None = None) -> tuple[np.ndarray, Config]:
    """Nesterov momentum in the course's form. config: learning_rate (1e-2), momentum (0.9), velocity."""
    v_prev, v, config = _momentum_step("sgd_nesterov", w, dw, config)
    mu = config["momentum"]
    return w - mu * v_prev + (1 + mu) * v, config


def rmsprop(w: np.ndarray, dw: np.ndarray, config: Config | None = None) -> tuple[np.ndarray, Config]:
    """config: learning_rate (1e-2), decay_rate (0.99), epsilon (1e-8), cache (zeros like w)."""
    _check("rmsprop", w, dw)
    config = {} if config is None else config
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("decay_rate", 0.99)
    config.setdefault("epsilon", 1e-8)
    cache = config.get("cache")
    cache = np.zeros_like(w) if cache is None else cache
    cache = config["decay_rate"] * cache + (1 - config["decay_rate"]) * dw * dw
    config["cache"] = cache
    return w - config["learning_rate"] * dw / (np.sqrt(cache) + config["epsilon"]), config


def adam(w: np.ndarray, dw: np.ndarray, config: Config | None = None) -> tuple[np.ndarray, Config]:
    """config: learning_rate (1e-3), beta1 (0.9), beta2 (0.999), epsilon (1e-8), m and v (zeros like w), t (0)."""
    _check("adam", w, dw)
    config = {} if config is None else config
    for k, v in (("learning_rate", 1e-3), ("beta1", 0.9), ("beta2", 0.999), ("epsilon", 1e-8), ("t", 0)):
        config.setdefault(k, v)
    b1, b2 = config["beta1"], config["beta2"]
    m = config.get("m")
    v = config.get("v")
    m = b1 * (np.zeros_like(w) if m is None else m) + (1 - b1) * dw
    v = b2 * (np.zeros_like(w) if v is None else v) + (1 - b2) * dw * dw
    config["t"] += 1
    t = config["t"]
    mt, vt = m / (1 - b1**t), v / (1 - b2**t)
    config["m"], config["v"] = m, v
    return w - config["learning_rate"] * mt / (np.sqrt(vt) + config["epsilon"]), config


RULES: dict[str, Callable[..., tuple[np.ndarray, Config]]] = {
    "sgd": sgd, "sgd_momentum": sgd_momentum, "sgd_nesterov": sgd_nesterov, "rmsprop": rmsprop, "adam": adam}
