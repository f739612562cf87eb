"""Argument checks shared by the NumPy layers: shapes, modes and caches, each refused with the names at fault.

Nothing is broadcast silently: every layer states the shapes it takes and checks them before computing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import VisrecError


class RefError(VisrecError, ValueError):
    """A wrong argument to a NumPy layer: its name, its shape and the shape expected."""


class Cache(tuple):
    """A layer's cache: the tuple the course's code passes around, tagged with the layer that made it, so that a
    backward pass given another layer's cache says so instead of computing nonsense."""

    layer: str

    def __new__(cls, layer: str, *items: Any) -> Cache:
        obj = super().__new__(cls, items)
        obj.layer = layer
        return obj


def cache_of(cache: Any, forward: str, backward: str) -> Cache:
    """The cache, checked to come from `forward` (the function that pairs with `backward`)."""
    if not isinstance(cache, Cache):
        raise RefError(f"{backward}: cache is a {type(cache).__name__}, not a cache made by {forward}",
                       f"pass the cache that {forward} returned")
    if cache.layer != forward:
        raise RefError(f"{backward}: cache comes from {cache.layer}, not {forward}",
                       f"pass the cache that {forward} returned")
    return cache


def array(name: str, x: Any, ndim: int | tuple[int, ...] | None = None, fn: str = "") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise RefError(f"{fn}: {name} must be a NumPy array, got {type(x).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and x.ndim not in dims:
        want = " or ".join(str(d) for d in dims)
        raise RefError(f"{fn}: {name} has shape {x.shape} ({x.ndim} dimensions); expected {want} dimensions")
    return x


def same(fn: str, name: str, got: tuple[int, ...], want: tuple[int, ...], what: str = "") -> None:
    if tuple(got) != tuple(want):
        raise RefError(f"{fn}: {name} has shape {tuple(got)}; expected {tuple(want)}" + (f" ({what})" if what else ""))


def mode_of(fn: str, param: dict[str, Any], default: str | None = None) -> str:
    mode = param.get("mode", default)
    if mode not in ("train", "test"):
        raise RefError(f"{fn}: mode {mode!r} is not valid", "use 'train' or 'test'")
    return mode
