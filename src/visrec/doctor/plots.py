"""The doctor's plots: loss curve, LR-finder curve, activation histograms, update/weight ratios, overfit curve."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..plotting import pyplot, save_figure


def plot_loss(windows: list[dict[str, Any]], path: Path) -> str | None:
    pts = [(w["step"], w["loss"], w.get("lr")) for w in windows if w.get("loss") is not None]
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="C0", label="train loss (window mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if any(p[2] for p in pts):
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], color="C1", alpha=0.6, label="learning rate")
        ax2.set_ylabel("learning rate", color="C1")
    ax.set_title("training loss")
    return save_figure(fig, path)


def plot_update_ratios(samples: list[dict[str, Any]], path: Path) -> str | None:
    layers: dict[str, list[tuple[int, float]]] = {}
    for s in samples:
        for name, v in s.get("layers", {}).items():
            r = v.get("ratio")
            if r is not None and math.isfinite(r) and r > 0:
                layers.setdefault(name, []).append((s["step"], r))
    if not layers:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (name, pts) in enumerate(layers.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name if i < 12 else None, lw=1)
    ax.axhline(1e-3, color="k", ls="--", lw=1, label="1e-3 (rule of thumb)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||update|| / ||weight||")
    ax.set_title("update/weight ratio per layer")
    ax.legend(fontsize=6, loc="best")
    return save_figure(fig, path)


def plot_activations(samples: list[dict[str, Any]], path: Path) -> str | None:
    sample = next((s for s in reversed(samples) if s.get("acts")), None)
    if sample is None:
        return None
    acts = [(n, a) for n, a in sample["acts"].items() if a.get("hist")]
    if not acts:
        return None
    acts = acts[:16]
    plt = pyplot()
    cols = min(4, len(acts))
    rows = math.ceil(len(acts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (name, a) in zip(axes.flat, acts, strict=False):
        ax.set_visible(True)
        h = a["hist"]
        width = (h["hi"] - h["lo"]) / len(h["counts"])
        ax.bar([h["lo"] + (i + 0.5) * width for i in range(len(h["counts"]))], h["counts"], width=width)
        extra = f" dead {a['dead']:.0%}" if "dead" in a else f" sat {a['saturated']:.0%}" if "saturated" in a else ""
        ax.set_title(f"{name}\nmean {a['mean']:.2g} std {a['std']:.2g}{extra}", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"activations at step {sample['step']}", fontsize=9)
    return save_figure(fig, path)


def plot_monitor(monitor, folder: Path) -> list[str]:
    made = [plot_loss(monitor.windows, folder / "loss.png"),
            plot_update_ratios(monitor.samples, folder / "update_ratios.png"),
            plot_activations(monitor.samples, folder / "activations.png")]
    return [m for m in made if m]


def plot_lr_finder(lrs: list[float], losses: list[float], suggested: float | None, configured: float,
                   path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(lrs, losses, color="C0", label="smoothed loss")
    ax.set_xscale("log")
    if suggested:
        ax.axvline(suggested, color="C2", ls="--", label=f"suggested {suggested:.2g}")
    ax.axvline(configured, color="C3", ls=":", label=f"configured {configured:.2g}")
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.95, min(max(finite), 4 * min(finite)) * 1.05)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("learning-rate range test")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_overfit(losses: list[float], accs: list[float], path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(losses, color="C0", label="loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(accs, color="C1", label="accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("training accuracy", color="C1")
    ax.set_title("overfitting a tiny subset")
    return save_figure(fig, path)
