"""Explanations of a run's model for images, drawn into RUN/explain/ as PNGs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VisrecError
from ..io import write_bytes
from ..plotting import figure_png, pyplot
from .methods import METHODS, attribute

FIGURES = ("filters", "activations", "errors", "tsne", "neighbors")


@dataclass
class Explanation:
    method: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    targets: list[int]
    probs: list[float]  # the model's probability of each target
    maps: torch.Tensor | None  # (N, H, W) for attribution methods
    files: list[Path] = field(default_factory=list)


def _target_index(value: str | int, classes: list[str]) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        i = int(value)
        if not 0 <= i < len(classes):
            raise VisrecError(f"class index {i} is out of range: the run has {len(classes)} classes (0.."
                              f"{len(classes) - 1})", f"classes: {', '.join(classes)}")
        return i
    if value not in classes:
        raise VisrecError(f"the run has no class {value!r}", f"its classes are: {', '.join(classes)}")
    return classes.index(value)


def _pick_test_images(run, n: int) -> torch.Tensor:
    """n test images spread over the classes (the first of each class in turn), from the run's own split."""
    from ..runs import dataset_from_config, remap_classes

    lm = run.load_model()
    test = remap_classes(dataset_from_config(run.config).test, lm.classes)
    per_class = [torch.nonzero(test.labels == c).flatten().tolist() for c in range(len(lm.classes))]
    order = [idx[k] for k in range(max(map(len, per_class), default=0)) for idx in per_class if k < len(idx)]
    return test.images[order[:n]]


def explain(run, method: str, images: list[Any] | None = None, *, target: str | int | None = None, n: int = 8,
            layer: str | None = None, out: str | Path | None = None, which: str = "auto", resize: bool = False,
            convert: bool = False, **options) -> Explanation:
    """Explain `run`'s model (a Run or a run folder) with `method` for image files (decoded as in training) or,
    by default, `n` test images; `target` is a class name or index (default: each image's predicted class)."""
    from ..runs import Run

    run = run if isinstance(run, Run) else Run(run)
    if method not in METHODS and method not in FIGURES:
        raise VisrecError(f"explain method {method!r} is not known",
                          f"choose one of: {', '.join([*FIGURES, *METHODS])}")
    lm = run.load_model(which, "cpu")
    model = lm.model
    folder = Path(out) if out else run.path / "explain"
    if method == "errors":
        return _errors(run, lm, folder, n)
    if method == "tsne":
        return _tsne(run, lm, folder, options.get("points", 1000))
    if method == "neighbors":
        return _neighbors(run, lm, folder, n)
    if images:
        x8 = torch.stack([run._to_tensor(i, lm, resize, convert) for i in images])
    else:
        x8 = _pick_test_images(run, n)
    x = lm.normalizer(x8)
    with torch.no_grad():
        probs = model(x).softmax(1)
    targets = probs.argmax(1) if target is None else torch.full((len(x),), _target_index(target, lm.classes))
    tp = probs.gather(1, targets[:, None])[:, 0].tolist()
    ex = Explanation(method, x8, targets.tolist(), tp, None)
    if method == "filters":
        ex.files.append(_write(folder / "filters.png", filters_figure(model)))
        return ex
    if method == "activations":
        ex.files.append(_write(folder / "activations.png", activations_figure(model, x[:1], lm.classes[targets[0]])))
        return ex
    ex.maps = attribute(method, model, x, targets, **({"layer": layer} if method == "gradcam" else {}), **options)
    ex.files.append(_write(folder / f"{method}.png", maps_figure(ex, lm.classes)))
    return ex


def _errors(run, lm, folder: Path, n: int) -> Explanation:
    """The most confidently wrong test images, with their true and predicted classes and the confidence."""
    from ..evaluate import predict_logits
    from ..runs import dataset_from_config, remap_classes

    test = remap_classes(dataset_from_config(run.config).test, lm.classes)
    probs = predict_logits(lm.model, test.images, lm.normalizer).softmax(1)
    conf, pred = probs.max(1)
    wrong = torch.nonzero(pred != test.labels).flatten()
    worst = wrong[conf[wrong].argsort(descending=True)][:n]
    ex = Explanation("errors", test.images[worst], pred[worst].tolist(), conf[worst].tolist(), None)
    plt = pyplot()
    cols = max(1, min(8, len(worst)))
    rows = max(1, math.ceil(len(worst) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols + 0.4, 1.9 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, i in enumerate(worst.tolist()):
        ax = axes.flat[k]
        _show(ax, test.images[i])
        ax.set_title(f"true {lm.classes[test.labels[i]]}\nsaid {lm.classes[pred[i]]} {conf[i]:.0%}", fontsize=7)
    fig.suptitle(f"the {len(worst)} most confidently wrong of {len(wrong)} errors in {len(test)} test images",
                 fontsize=9)
    ex.files.append(_write(folder / "errors.png", figure_png(fig, dpi=110)))
    return ex


def _stratified(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """About k indices spread evenly over the classes, in a seeded order."""
    from ..data import stratified_subset

    return stratified_subset(labels, min(k, len(labels)), seed) if k < len(labels) else torch.arange(len(labels))


def _tsne(run, lm, folder: Path, points: int) -> Explanation:
    """t-SNE of the penultimate features of test images, coloured by their true class."""
    from sklearn.manifold import TSNE

    from ..runs import dataset_from_config, remap_classes
    from ..transfer import extract_features

    test = remap_classes(dataset_from_config(run.config).test, lm.classes)
    idx = _stratified(test.labels, points)
    feats = extract_features(lm.model, test.images[idx], lm.normalizer)
    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, max(5.0, (len(idx) - 1) / 4)),
              random_state=0).fit_transform(feats.numpy())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    labels = test.labels[idx]
    for c, name in enumerate(lm.classes):
        sel = (labels == c).numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.8, label=name, color=plt.cm.tab20(c % 20))
    ax.set_xticks([])
    ax.set_yticks([])
    if len(lm.classes) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(f"t-SNE of the penultimate features of {len(idx)} test images ({feats.shape[1]} dims)")
    ex = Explanation("tsne", test.images[idx], labels.tolist(), [], None)
    ex.files.append(_write(folder / "tsne.png", figure_png(fig, dpi=110)))
    return ex


def _neighbors(run, lm, folder: Path, n: int, k: int = 6, pool: int = 10000) -> Explanation:
    """For n test images, the k nearest training images in feature space (the network's penultimate layer) and in
    pixel space (L2 on raw pixels): features find the same class, pixels find the same brightness and layout."""
    from ..runs import dataset_from_config, remap_classes
    from ..transfer import extract_features

    ds = dataset_from_config(run.config)
    test, train = remap_classes(ds.test, lm.classes), remap_classes(ds.train, lm.classes)
    q = _stratified(test.labels, n, seed=1)[:n]
    t = _stratified(train.labels, pool, seed=2)
    fq, ft = (extract_features(lm.model, s, lm.normalizer) for s in (test.images[q], train.images[t]))
    by_feat = torch.cdist(fq, ft).topk(k, largest=False).indices
    pq, pt = test.images[q].flatten(1).float(), train.images[t].flatten(1).float()
    by_pixel = torch.cdist(pq, pt).topk(k, largest=False).indices
    plt = pyplot()
    fig, axes = plt.subplots(2 * len(q), k + 1, figsize=(1.1 * (k + 1) + 0.6, 2.3 * len(q) + 0.4), squeeze=False)
    agree = {"features": 0, "pixels": 0}
    for r, i in enumerate(q.tolist()):
        for row, (name, nn_idx) in enumerate((("features", by_feat[r]), ("pixels", by_pixel[r]))):
            axes[2 * r + row, 0].axis("off")
            if row == 0:
                _show(axes[2 * r, 0], test.images[i])
                axes[2 * r, 0].set_title(lm.classes[test.labels[i]], fontsize=7)
            else:
                axes[2 * r + 1, 0].text(0.5, 0.5, "", ha="center")
            for c, j in enumerate(t[nn_idx].tolist()):
                _show(axes[2 * r + row, c + 1], train.images[j])
                same = int(train.labels[j]) == int(test.labels[i])
                agree[name] += same
                axes[2 * r + row, c + 1].set_title(("" if same else "x ") + lm.classes[train.labels[j]], fontsize=6,
                                                   color="black" if same else "red")
            axes[2 * r + row, 1].text(-0.15, 0.5, name, transform=axes[2 * r + row, 1].transAxes, rotation=90,
                                      va="center", ha="right", fontsize=7)
    total = len(q) * k
    fig.suptitle(f"nearest training images: same class {agree['features']}/{total} by features, "
                 f"{agree['pixels']}/{total} by pixels", fontsize=9)
    ex = Explanation("neighbors", test.images[q], test.labels[q].tolist(),
                     [agree["features"] / total, agree["pixels"] / total], None)
    ex.files.append(_write(folder / "neighbors.png", figure_png(fig, dpi=100)))
    return ex


def _write(path: Path, png: bytes) -> Path:
    write_bytes(path, png)
    return path


def _show(ax, img8: torch.Tensor) -> None:
    img = img8.permute(1, 2, 0).numpy()
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
              vmin=0, vmax=255)
    ax.axis("off")


def maps_figure(ex: Explanation, classes: list[str]) -> bytes:
    plt = pyplot()
    n = len(ex.images)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n + 0.4, 3.6), squeeze=False)
    for k in range(n):
        _show(axes[0, k], ex.images[k])
        axes[0, k].set_title(f"{classes[ex.targets[k]]}\n{ex.probs[k]:.0%}", fontsize=7)
        m = ex.maps[k]
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        _show(axes[1, k], ex.images[k])
        axes[1, k].imshow(m.numpy(), cmap="jet", vmin=0, vmax=1, alpha=0.55)
    fig.suptitle(f"{ex.method}: the map over each image (class and the model's probability above)", fontsize=9)
    fig.subplots_adjust(hspace=0.3)
    return figure_png(fig, dpi=110)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise VisrecError(f"{type(model).__name__} has no convolutional layer: it has no filters to show",
                      "use saliency or occlusion for this model")


def filters_figure(model: nn.Module) -> bytes:
    """The first convolution's filters as small images (RGB for 3 input channels, else the channel mean)."""
    w = _first_conv(model).weight.detach().float().cpu()
    k = w.shape[0]
    cols = min(16, k)
    rows = math.ceil(k / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= k:
            continue
        f = w[i]
        f = (f - f.min()) / (f.max() - f.min()).clamp_min(1e-12)
        ax.imshow(f.permute(1, 2, 0).numpy() if f.shape[0] == 3 else f.mean(0).numpy(), cmap="gray",
                  interpolation="nearest")
    fig.suptitle(f"first-layer filters ({k} x {tuple(w.shape[1:])})", fontsize=9)
    return figure_png(fig, dpi=110)


@torch.no_grad()
def activations_figure(model: nn.Module, x: torch.Tensor, label: str, per_stage: int = 8) -> bytes:
    """Up to `per_stage` channel maps of every stage for one image."""
    from ..models import feature_maps

    maps = {k: v for k, v in feature_maps(model, x).items() if v.dim() == 4}
    if not maps:
        raise VisrecError(f"{type(model).__name__} has no spatial feature maps to show")
    plt = pyplot()
    fig, axes = plt.subplots(len(maps), per_stage, figsize=(per_stage * 0.9, len(maps) * 1.0 + 0.4),
                             squeeze=False)
    for r, (name, a) in enumerate(maps.items()):
        strongest = a[0].flatten(1).mean(1).argsort(descending=True)[:per_stage]
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(strongest):
                ax.imshow(a[0, strongest[c]].float().numpy(), cmap="viridis")
        axes[r, 0].set_title(f"{name} {tuple(a.shape[1:])}", fontsize=6, loc="left")
    fig.suptitle(f"strongest activation maps per stage ({label})", fontsize=9)
    return figure_png(fig, dpi=110)
