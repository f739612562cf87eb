"""The coercion engine under visrec's typed configuration: a value read from YAML, `--set` or a search file checked
against a declared type (`Annotated[...]` with a `Range` or a `Pattern`, `Literal[...]` choices, unions, lists,
mappings) and converted to it, with an error that names the key, where it came from and what is valid. The schema
(the config's sections, a task's options) lives with its owners; this module knows only types.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from .errors import VisrecError, closest


@dataclass(frozen=True)
class Range:
    """A number's allowed interval, checked where the value is parsed: `Annotated[float, Range(0, 1)]`."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    hint: str = ""

    def ok(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.open_low and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.open_high and v == self.high)))

    def describe(self) -> str:
        lo = "" if self.low is None else f"{'>' if self.open_low else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.open_high else '<='} {self.high:g}"
        return " and ".join(p for p in (lo, hi) if p)


@dataclass(frozen=True)
class Pattern:
    """A string's allowed form, as a regular expression matched whole, with the words that describe it."""

    regex: str
    describe: str


AtLeast1 = Annotated[int, Range(1)]
NonNegInt = Annotated[int, Range(0)]
NonNeg = Annotated[float, Range(0)]
Positive = Annotated[float, Range(0, open_low=True)]
Fraction = Annotated[float, Range(0, 1)]
OpenFraction = Annotated[float, Range(0, 1, open_high=True)]  # [0, 1)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A config section's field types, resolved once per class (resolving them took 15 ms per config read)."""
    return typing.get_type_hints(cls, include_extras=True)


def coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check and convert a value for a field of type `tp`; the error names the key, the source and what is valid."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        value = coerce(value, args[0], key, source)
        for rule in tp.__metadata__:
            if isinstance(rule, Range) and value is not None and not rule.ok(value):
                raise VisrecError(f"{source}: {key}={value!r} must be {rule.describe()}",
                                  rule.hint or f"for example: --set {key}={example(tp)}")
            if isinstance(rule, Pattern) and not re.fullmatch(rule.regex, value):
                raise VisrecError(f"{source}: {key}={value!r} is not valid", f"use {rule.describe}")
        return value
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:
            value = "on" if value else "off"  # YAML reads on/off as booleans
        if isinstance(value, str) and value not in args and value.isdigit() and int(value) in args:
            value = int(value)
        if value in args and not isinstance(value, bool):
            return value
        return bad_choice(key, value, args, source)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key, source)
    bad = VisrecError(
        f"{source}: {key} must be {type_name(tp)}, got {value!r}",
        f"for example: --set {key}={example(tp)}",
    )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no"):
            return value.lower() in ("true", "on", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, list | tuple):
            raise bad
        return [coerce(v, args[0], key, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(f"unsupported config type {tp}")  # a bug in the config definition


def bad_choice(key: str, value: Any, choices: tuple, source: str) -> typing.NoReturn:
    names = [str(c) for c in choices]
    close = closest(str(value), names)
    raise VisrecError(f"{source}: {key}={value!r} is not one of its values: {', '.join(names)}",
                      f"did you mean {close!r}?" if close else f"for example: --set {key}={names[0]}")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "none"}.get(
        tp, str(tp)
    )


def example(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        for r in rules:
            if isinstance(r, Range) and r.low is not None:
                v = r.low + (0.1 if base is float and (r.open_low or r.low == 0) else 1 if r.open_low else 0)
                return f"{v:g}" if base is float else str(int(v))
        return example(base)
    if origin is Literal:
        return str(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return example([a for a in typing.get_args(tp) if a is not type(None)][0])
    if origin is list:
        return "a,b"
    if origin is dict:
        return "{k: v}"
    return {bool: "true", int: "10", float: "0.1", str: "name"}.get(tp, "...")
