"""Matplotlib without a display: one way to get pyplot and to turn a figure into PNG bytes or a file."""

from __future__ import annotations

import io
from pathlib import Path

from .io import write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (works on machines without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 100, tight: bool = True) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    if tight:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: str | Path, dpi: int = 100) -> str:
    """Write the figure as a PNG atomically; returns the path."""
    write_bytes(path, figure_png(fig, dpi))
    return str(path)
