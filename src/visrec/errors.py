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
    close = difflib.get_close_matches(name, valid, n=1)
    where = f" (from {option})" if option else ""
    msg = f"unknown {kind} {name!r}{where}. Valid {kind}s: {', '.join(valid)}"
    hint = f"did you mean {close[0]!r}?" if close else None
    return VisrecError(msg, hint)
