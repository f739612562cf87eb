"""Explanations of a run's model for images, drawn into RUN/explain/ as PNGs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import VisrecError, closest
from ..io import write_bytes
from ..plotting import figure_png, pyplot
from ..tasks import task_class
from .methods import METHODS, attribute

FIGURES = ("filters", "activations", "errors", "confused", "tsne", "neighbors", "class_model", "fooling", "inversion")


@dataclass
class Explanation:
    method: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    targets: list[int]
    probs: list[float]  # the model's probability of each target
    maps: torch.Tensor | None  # (N, H, W) for attribution methods
    files: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # method-specific results (confused pairs, attack sizes)


def _target_index(value: str | int, classes: list[str]) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        i = int(value)
        if not 0 <= i < len(classes):
            raise VisrecError(f"class index {i} is out of range: the run has {len(classes)} classes (0.."
                              f"{len(classes) - 1})", f"classes: {', '.join(classes)}")
        return i
    if value not in classes:
        close = closest(str(value), classes)
        raise VisrecError(f"the run has no class {value!r}", (f"did you mean {close!r}? " if close else "")
                          + f"its classes are: {', '.join(classes)}")
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
            layer: str | None = None, out: str | Path | None = None, which: str = "auto", resize: bool | None = None,
            convert: bool | None = None, **options) -> Explanation:
    """Explain `run`'s model (a Run or a run folder) with `method` for image files (decoded as in training) or,
    by default, `n` test images; `target` is a class name or index (default: each image's predicted class)."""
    from ..runs import Run

    run = run if isinstance(run, Run) else Run(run)
    if not task_class(run.config.task.name).class_scores:
        raise VisrecError(f"{run.path} is a {run.config.task.name} run: the explanations are written for "
                          "classification runs", f"its report shows its own figures: {run.path / 'report.html'}")
    if method not in METHODS and method not in FIGURES:
        close = closest(method, [*FIGURES, *METHODS])
        raise VisrecError(f"explain method {method!r} is not known", (f"did you mean {close!r}? " if close else "")
                          + f"choose one of: {', '.join([*FIGURES, *METHODS])}")
    lm = run.load_model(which, "cpu")
    model = lm.model
    folder = Path(out) if out else run.path / "explain"
    if method == "errors":
        return _errors(run, lm, folder, n)
    if method == "tsne":
        return _tsne(run, lm, folder, options.get("points", 1000))
    if method == "neighbors":
        return _neighbors(run, lm, folder, n)
    if method == "confused":
        return _confused(run, lm, folder, n)
    if method == "class_model":
        return _class_model(lm, folder, None if target is None else _target_index(target, lm.classes), n, options)
    if images:
        # decoded and fitted by the run's own predictor (default: as training did, as predict does)
        p = run.predictor(which=which, backend="torch", resize=resize, convert=convert)
        x8 = torch.stack([p.load(i, str(i) if isinstance(i, str | Path) else None).x for i in images])
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
    if method == "fooling":
        return _fooling(lm, folder, x, probs, None if target is None else _target_index(target, lm.classes), options)
    if method == "inversion":
        return _inversion(lm, folder, x[:4], targets[:4].tolist(), tp[:4], layer, options)
    ex.maps = attribute(method, model, x, targets, **({"layer": layer} if method == "gradcam" else {}), **options)
    ex.files.append(_write(folder / f"{method}.png", maps_figure(ex, lm.classes)))
    return ex


def test_predictions(run, lm) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The run's test split (in the model's class order) with each image's predicted class and its probability,
    under the run's own test-time augmentation: the same predictions as its test evaluation, so every figure agrees
    with the confusion matrix. They are read from the run's predictions.csv when the training's own test
    evaluation wrote it for these weights and this split, and computed otherwise."""
    from ..evaluate import evaluate, resolve_crop_pad, resolve_tta
    from ..runs import dataset_from_config, remap_classes

    cfg = run.config
    test = remap_classes(dataset_from_config(cfg).test, lm.classes)
    saved = saved_predictions(run, lm, test.labels)
    if saved is not None:
        return test, *saved
    res = evaluate(lm.model, test, lm.normalizer, tta=run.summary.get("tta") or resolve_tta(cfg.eval.tta,
                   cfg.data.augment), crop_pad=resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment))
    return test, res.confidence, res.pred


def saved_predictions(run, lm, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(confidence, predicted class) from the run's predictions.csv when it belongs to `lm`'s weights and this
    split: `lm` holds the weights the run was evaluated with, the file was written no earlier than their
    checkpoint, it has one row per image and every true class equals `labels`. None otherwise."""
    from ..evaluate import EvalResult

    path, ckpt = run.path / "predictions.csv", Path(lm.checkpoint)
    try:
        if (not path.is_file() or ckpt.stem != run.checkpoint_tag("auto")
                or path.stat().st_mtime < ckpt.stat().st_mtime):
            return None
    except OSError:
        return None
    read = EvalResult.read_predictions_csv(path, lm.classes)
    if read is None or not torch.equal(read[0], labels.cpu().long()):
        return None
    return read[2], read[1]


def _errors(run, lm, folder: Path, n: int, predictions=None) -> Explanation:
    """The most confidently wrong test images, with their true and predicted classes and the confidence
    (`predictions`: test_predictions' answer, if already at hand)."""
    test, conf, pred = predictions or test_predictions(run, lm)
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


def confused_pairs(labels: torch.Tensor, pred: torch.Tensor, num_classes: int, k: int) -> list[tuple[int, int, int]]:
    """The k most frequent (true, predicted, count) mistakes, most frequent first (ties by class order)."""
    cm = torch.bincount(labels * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    cm.fill_diagonal_(0)
    order = cm.flatten().argsort(descending=True, stable=True)[:k]
    return [(int(i) // num_classes, int(i) % num_classes, int(cm.flatten()[i])) for i in order if cm.flatten()[i] > 0]


def _confused(run, lm, folder: Path, n: int, pairs: int = 5, predictions=None) -> Explanation:
    """The most confused class pairs of the test split, each a row of its most confidently wrong images
    (`predictions`: as in _errors)."""
    test, conf, pred = predictions or test_predictions(run, lm)
    top = confused_pairs(test.labels, pred, len(lm.classes), pairs)
    cols = max(1, min(n, 8))
    plt = pyplot()
    fig, axes = plt.subplots(max(1, len(top)), cols + 1, figsize=(1.3 * (cols + 1) + 0.8, 1.45 * max(1, len(top))
                                                                  + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    shown, counts = [], []
    for r, (a, b, count) in enumerate(top):
        idx = torch.nonzero((test.labels == a) & (pred == b)).flatten()
        idx = idx[conf[idx].argsort(descending=True)][:cols]
        axes[r, 0].text(1.0, 0.5, f"true {lm.classes[a]}\nsaid {lm.classes[b]}\n{count} times", ha="right",
                        va="center", fontsize=7, transform=axes[r, 0].transAxes)
        for c, i in enumerate(idx.tolist()):
            _show(axes[r, c + 1], test.images[i])
            axes[r, c + 1].set_title(f"{conf[i]:.0%}", fontsize=6)
        shown += idx.tolist()
        counts.append(count)
    wrong = int((pred != test.labels).sum())
    title = (f"the {len(top)} most confused pairs ({sum(counts)} of {wrong} errors in {len(test)} test images)"
             if top else f"no errors in {len(test)} test images")
    fig.suptitle(title, fontsize=9)
    ex = Explanation("confused", test.images[shown] if shown else test.images[:0], [b for _, b, _ in top],
                     [c / max(1, len(test)) for c in counts], None)
    ex.info["pairs"] = [(lm.classes[a], lm.classes[b], c) for a, b, c in top]
    ex.files.append(_write(folder / "confused.png", figure_png(fig, dpi=110)))
    return ex


def _display(x: torch.Tensor, normalizer, stretch: bool = False) -> torch.Tensor:
    """Normalized images -> uint8 pixels for display; `stretch` maps each image's own range to 0..255."""
    from .synthesis import to_pixels

    p = to_pixels(x.detach().float().cpu(), normalizer)
    if stretch:
        lo = p.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = p.flatten(1).amax(1).view(-1, 1, 1, 1)
        p = (p - lo) / (hi - lo).clamp_min(1e-6) * 255
    return p.round().clamp(0, 255).to(torch.uint8)


def _class_model(lm, folder: Path, cls: int | None, n: int, options: dict) -> Explanation:
    """The input each class's score likes most (gradient ascent with L2, blur and jitter), one panel per class."""
    from .synthesis import class_model

    classes = [cls] if cls is not None else list(range(min(len(lm.classes), max(n, 10))))
    c, (h, w) = lm.in_chans, lm.image_size
    keys = ("steps", "lr", "l2", "blur_every", "blur_sigma", "jitter", "seed")
    x = class_model(lm.model, torch.tensor(classes), lm.normalizer, (c, h, w),
                    **{k: v for k, v in options.items() if k in keys})
    with torch.no_grad():
        probs = lm.model.eval()(x).softmax(1)
    tp = [float(probs[k, cl]) for k, cl in enumerate(classes)]
    images = _display(x, lm.normalizer, stretch=True)
    plt = pyplot()
    cols = min(5, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.4, 2.1 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, cl in enumerate(classes):
        _show(axes.flat[k], images[k])
        axes.flat[k].set_title(f"{lm.classes[cl]}\np={tp[k]:.2f}", fontsize=7)
    fig.suptitle("class models: inputs that maximize each class score (L2, blur, jitter regularized)", fontsize=9)
    ex = Explanation("class_model", images, classes, tp, None)
    ex.files.append(_write(folder / "class_model.png", figure_png(fig, dpi=110)))
    return ex


def _fooling(lm, folder: Path, x: torch.Tensor, probs: torch.Tensor, cls: int | None, options: dict) -> Explanation:
    """Fooling images: each image pushed to a target class (`cls`, else its runner-up class) by the smallest
    gradient steps that flip the prediction; the change is shown magnified."""
    from .synthesis import fooling

    pred = probs.argmax(1)
    if cls is None:
        target = probs.topk(2, dim=1).indices[:, 1]
    else:
        target = torch.full((len(x),), cls)
        keep = pred != cls  # an image the model already puts in the target class cannot be fooled into it
        x, probs, pred, target = x[keep], probs[keep], pred[keep], target[keep]
        if not len(x):
            raise VisrecError(f"every image is already predicted as {lm.classes[cls]!r}",
                              "give images of other classes or another --class")
    keys = ("step", "max_steps")
    res = fooling(lm.model, x, target, lm.normalizer, **{k: v for k, v in options.items() if k in keys})
    with torch.no_grad():
        after = lm.model.eval()(res.images).softmax(1)
    orig, adv = _display(x, lm.normalizer), _display(res.images, lm.normalizer)
    diff = adv.float() - orig.float()
    mag = float(options.get("magnify", 10))
    plt = pyplot()
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n + 0.6, 5.4), squeeze=False)
    for k in range(n):
        _show(axes[0, k], orig[k])
        axes[0, k].set_title(f"{lm.classes[pred[k]]} {probs[k, pred[k]]:.0%}", fontsize=7)
        _show(axes[1, k], adv[k])
        said = int(after[k].argmax())
        axes[1, k].set_title(f"{lm.classes[said]} {after[k, said]:.0%}" + ("" if res.fooled[k] else " (not fooled)"),
                             fontsize=7, color="black" if res.fooled[k] else "red")
        _show(axes[2, k], (127.5 + mag * diff[k]).round().clamp(0, 255).to(torch.uint8))
        axes[2, k].set_title(f"max {res.linf[k]:.0f}/255, {res.steps[k]} steps", fontsize=6)
    for r, name in enumerate(("original", f"fooled (target: {'runner-up' if cls is None else lm.classes[cls]})",
                              f"change x{mag:g}")):
        axes[r, 0].text(-0.12, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right",
                        fontsize=7)
    fig.suptitle(f"fooling images: {sum(res.fooled)}/{n} flipped to the target class", fontsize=9)
    ex = Explanation("fooling", adv, target.tolist(), [float(after[k, target[k]]) for k in range(n)], None)
    ex.info.update(fooled=res.fooled, steps=res.steps, linf=res.linf, l2=res.l2)
    ex.files.append(_write(folder / "fooling.png", figure_png(fig, dpi=110)))
    return ex


def _inversion(lm, folder: Path, x: torch.Tensor, targets: list[int], tp: list[float], layer: str | None,
               options: dict) -> Explanation:
    """Feature inversion: for each image, the image reconstructed from its features at every stage (or `layer`)."""
    from ..models import feature_maps
    from .synthesis import invert

    with torch.no_grad():
        stages = list(feature_maps(lm.model.eval(), x[:1]))
    if layer is not None:
        if layer not in stages:
            raise VisrecError(f"{type(lm.model).__name__} has no stage {layer!r} for inversion",
                              f"its stages are: {', '.join(stages)}")
        stages = [layer]
    keys = ("steps", "lr", "tv", "l2", "seed")
    recs = [_display(invert(lm.model, x, s, lm.normalizer, **{k: v for k, v in options.items() if k in keys}),
                     lm.normalizer) for s in stages]
    plt = pyplot()
    fig, axes = plt.subplots(len(x), len(stages) + 1, figsize=(1.5 * (len(stages) + 1) + 0.4, 1.7 * len(x) + 0.5),
                             squeeze=False)
    orig = _display(x, lm.normalizer)
    for r in range(len(x)):
        _show(axes[r, 0], orig[r])
        axes[r, 0].set_title(f"{lm.classes[targets[r]]}", fontsize=7)
        for c, s in enumerate(stages):
            _show(axes[r, c + 1], recs[c][r])
            if r == 0:
                axes[r, c + 1].set_title(s, fontsize=7)
    fig.suptitle("feature inversion: images rebuilt from each stage's features", fontsize=9)
    ex = Explanation("inversion", torch.cat(recs), targets, tp, None)
    ex.files.append(_write(folder / "inversion.png", figure_png(fig, dpi=110)))
    return ex


def _stratified(labels: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """About k indices spread evenly over the classes, in a seeded order."""
    from ..data import stratified_subset

    return stratified_subset(labels, min(k, len(labels)), seed) if k < len(labels) else torch.arange(len(labels))


def _tsne(run, lm, folder: Path, points: int) -> Explanation:
    """t-SNE of the penultimate features of test images, coloured by their true class."""
    from sklearn.manifold import TSNE

    from ..runs import dataset_from_config, remap_classes
    from ..training.finetune import extract_features

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
    from ..training.finetune import extract_features

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


def _rgb(img8: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> float (H, W, 3) in [0, 1]."""
    a = img8.permute(1, 2, 0).float().numpy() / 255.0
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a[..., :3]


def maps_figure(ex: Explanation, classes: list[str], cols: int = 10) -> bytes:
    """Each image above its map (overlaid in jet), `cols` images to a row pair, drawn as one mosaic (fast)."""
    plt = pyplot()
    n = len(ex.images)
    cols = max(1, min(n, cols))
    groups = math.ceil(n / cols)
    h, w = ex.images.shape[2:]
    gap = max(2, h // 8)
    mosaic = np.ones((groups * (2 * h + 3 * gap), cols * (w + gap), 3))
    jet = plt.get_cmap("jet")
    for k in range(n):
        top, left = (k // cols) * (2 * h + 3 * gap) + gap, (k % cols) * (w + gap)
        img = _rgb(ex.images[k])
        m = ex.maps[k]
        m = ((m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)).numpy()
        mosaic[top: top + h, left: left + w] = img
        mosaic[top + h + gap: top + 2 * h + gap, left: left + w] = 0.45 * img + 0.55 * jet(m)[..., :3]
    fig, ax = plt.subplots(figsize=(1.3 * cols + 0.4, 2.8 * groups + 0.4))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    for k in range(n):
        top, left = (k // cols) * (2 * h + 3 * gap) + gap, (k % cols) * (w + gap)
        ax.text(left + w / 2, top - 0.5, f"{classes[ex.targets[k]]} {ex.probs[k]:.0%}", ha="center", va="bottom",
                fontsize=6)
    ax.set_title(f"{ex.method}: each image above its map (class and the model's probability)", fontsize=9)
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
