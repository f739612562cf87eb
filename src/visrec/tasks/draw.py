"""Figures of the tasks: grids of test images to draw truth and predictions on, images with true and predicted boxes
(and masks), precision-recall curves."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..plotting import figure_png, pyplot

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], dtype=np.float32) / 255


def _rgb(img: torch.Tensor) -> np.ndarray:
    a = img.permute(1, 2, 0).float().numpy() / 255
    return np.repeat(a, 3, 2) if a.shape[2] == 1 else a[..., :3]


def image_grid(x8: torch.Tensor, panel_height: float = 2.6):
    """(figure, axes): one panel per uint8 image (C, H, W) of `x8`, at most 4 per row, each image shown and every axis
    off, for the caller to draw truth and predictions on (axes.flat[i] is image i's)."""
    plt = pyplot()
    n = len(x8)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, panel_height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        img = x8[i].permute(1, 2, 0).numpy()
        axes.flat[i].imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
    return fig, axes


def overlay(img: np.ndarray, masks: list[np.ndarray], labels: list[int], alpha: float = 0.45) -> np.ndarray:
    """Masks tinted over an RGB image in [0, 1], one color per class."""
    out = img.copy()
    for m, lab in zip(masks, labels, strict=True):
        c = PALETTE[lab % len(PALETTE)]
        out[m] = (1 - alpha) * out[m] + alpha * c
    return out


def draw_boxes(ax, boxes: torch.Tensor, labels: list[int], classes: list[str], color: str,
               scores: list[float] | None = None) -> None:
    from matplotlib.patches import Rectangle

    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=color, lw=1.2))
        name = classes[labels[i]] if 0 <= labels[i] < len(classes) else str(labels[i])
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        ax.text(x0, y0, text, fontsize=5, color="white", va="bottom",
                bbox={"facecolor": color, "alpha": 0.7, "pad": 0.5, "lw": 0})


def detection_grid(images: torch.Tensor, targets: dict[str, torch.Tensor], dets: list[dict[str, torch.Tensor]],
                   classes: list[str], *, masks: bool = False, min_score: float = 0.5) -> bytes:
    """Pairs of panels: the truth (green) and the detections scoring at least `min_score` (red)."""
    plt = pyplot()
    n = len(images)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.0 * 2 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        left, right = axes.flat[2 * i], axes.flat[2 * i + 1]
        img = _rgb(images[i])
        keep = targets["box_labels"][i] >= 0
        tl = targets["box_labels"][i][keep].tolist()
        d = dets[i]
        good = d["scores"] >= min_score
        pl = d["labels"][good].tolist()
        true_img, pred_img = img, img
        if masks:
            slots = keep.nonzero()[:, 0] + 1
            from .detection import instance_masks

            true_img = overlay(img, [m.numpy() for m in instance_masks(targets, i, slots)], tl)
            if "masks" in d:
                pred_img = overlay(img, [(m[0] > 0.5).numpy() for m in d["masks"][good]], pl)
        left.imshow(true_img)
        right.imshow(pred_img)
        draw_boxes(left, targets["boxes"][i][keep], tl, classes, "#27ae60")
        draw_boxes(right, d["boxes"][good], pl, classes, "#c0392b", d["scores"][good].tolist())
    return figure_png(fig, dpi=110)


def pr_curve_figure(curves_path: Path, ap_path: Path | None = None) -> bytes:
    """Precision against recall per class, from `pr_curves_<split>.json`, labelled with each class's AP@0.5."""
    doc = json.loads(Path(curves_path).read_text())
    ap50: dict[str, str] = {}
    if ap_path is not None and Path(ap_path).is_file():
        with open(ap_path, newline="") as f:
            ap50 = {r["class"]: r["ap50"] for r in csv.DictReader(f)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    recall = doc["recall"]
    for name, prec in doc["precision"].items():
        ap = ap50.get(name, "")
        ax.plot(recall, prec, lw=1.2, label=f"{name} ({float(ap):.2f})" if ap else name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    return figure_png(fig, dpi=100)
