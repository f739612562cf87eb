"""User-facing errors: each says what is wrong and what to do about it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VisrecError(Exception):
    """An error caused by the user's input (a name, a file, a value), with a hint that fixes it.

    The CLI prints these as one short message instead of a traceback.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def unknown_name(kind: str, name: str, valid: Iterable[str], option: str | None = None) -> VisrecError:
    """The error for a name that is not in a registry: lists the valid names and the closest match."""
    valid = sorted(valid)
    close = closest(name, valid)
    where = f" (from {option})" if option else ""
    head, sep, tail = kind.partition(" of ")  # "key of section 'optim'" -> "keys of section 'optim'"
    msg = f"unknown {kind} {name!r}{where}. Valid {head}s{sep}{tail}: {', '.join(valid)}"
    hint = f"did you mean {close!r}?" if close else None
    return VisrecError(msg, hint)


def closest(name: str, valid: Iterable[str]) -> str | None:
    """The valid name closest to `name`, or None. A valid name that contains `name` comes first (the shortest, then
    the first in order: `flip` -> `hflip`, not the equally short `vflip` or the longer `altflip`), then the most
    similar by difflib."""
    valid = sorted(valid)
    low = name.lower()
    for v in valid:
        if v.lower() == low:
            return v
    contained = [v for v in valid if low in v.lower()]
    if contained:
        return min(contained, key=len)
    close = difflib.get_close_matches(name, valid, n=1)
    return close[0] if close else None
