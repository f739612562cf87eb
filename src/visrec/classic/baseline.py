"""`visrec baseline`: a classic method on a dataset, with the course's model selection, into a run folder.

    result = visrec.classic.baseline("fashion-mnist", method="knn", features="raw", ks=[1, 3, 5, 10])
    result["test_acc"], result["run"]

- knn: k chosen by n-fold cross-validation over `ks` on (at most `cv_examples` of) the training data,
  then the whole training split (train + val) votes for the test images.
- svm / softmax / twolayer: learning rate and regularization chosen on the validation split from a
  small log-spaced grid (a few epochs each), then the best setting trained for `epochs` and tested once.
Features other than raw pixels are standardized per dimension with training statistics; raw pixels
are scaled to 0..1 for kNN and standardized for the learned models.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..data import load_dataset
from ..data.catalog import source_label
from ..errors import VisrecError, unknown_name
from ..evaluate import EvalResult
from ..io import write_json
from ..plotting import pyplot, save_figure
from .features import extract, standardize
from .knn import KNN, cross_validate_k
from .linear import LinearClassifier
from .twolayer import TwoLayerNet

METHODS = ("knn", "svm", "softmax", "twolayer")
DEFAULT_LRS = {"svm": [1e-3, 1e-2, 1e-1, 1.0], "softmax": [1e-3, 1e-2, 1e-1, 1.0], "twolayer": [1e-2, 3e-2, 1e-1]}
DEFAULT_REGS = {"svm": [1e-5, 1e-4, 1e-3, 1e-2], "softmax": [1e-5, 1e-4, 1e-3, 1e-2], "twolayer": [1e-5, 1e-4, 1e-3]}


def _plot_cv(cv, metric: str, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ks = cv.ks
    for k in ks:
        ax.scatter([k] * len(cv.fold_acc[k]), cv.fold_acc[k], s=8, color="0.6")
    ax.errorbar(ks, [cv.mean(k) for k in ks], yerr=[cv.std(k) for k in ks], marker="o", capsize=3)
    ax.set_xlabel("k")
    ax.set_ylabel("cross-validation accuracy")
    ax.set_title(f"kNN ({metric}): {len(cv.fold_acc[ks[0]])}-fold cross-validation, best k = {cv.best_k}")
    save_figure(fig, path)


def _plot_templates(W: torch.Tensor, shape: tuple[int, int, int], classes: list[str], path: Path) -> None:
    """One image per class: the learned weights of that class, rescaled to 0..1."""
    plt = pyplot()
    c, h, w = shape
    n = W.shape[1]
    cols = min(10, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, ax in zip(range(n), axes.flat, strict=False):
        t = W[:, j].reshape(c, h, w).float()
        t = (t - t.min()) / (t.max() - t.min()).clamp_min(1e-12)
        ax.imshow(t.permute(1, 2, 0).numpy() if c == 3 else t[0].numpy(), cmap=None if c == 3 else "gray")
        ax.set_title(classes[j][:12], fontsize=7)
    fig.suptitle("learned weights per class (templates)", fontsize=9)
    save_figure(fig, path)


def baseline(
    data: str = "fashion-mnist",
    *,
    method: str = "knn",
    features: str = "raw",
    ks: list[int] | None = None,
    folds: int = 5,
    metric: str = "l2",
    cv_examples: int = 10000,
    lrs: list[float] | None = None,
    regs: list[float] | None = None,
    epochs: int = 10,
    search_epochs: int = 3,
    hidden: int = 200,
    batch_size: int = 256,
    subset: int | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    solver: str = "sgd",
    image_size: int | None = None,
) -> dict[str, Any]:
    """Run one classic method; write a run folder; return its summary (also in summary.json). `solver`: sgd, or
    newton (softmax only: full-batch Newton's method, no learning rate to search). `image_size`: resize every image
    to this square size first (an image folder of mixed sizes needs it)."""
    if method not in METHODS:
        raise unknown_name("baseline method", method, METHODS, "--method")
    if solver not in ("sgd", "newton"):
        raise VisrecError(f"--solver {solver!r} is not valid", "use sgd or newton")
    if solver == "newton" and method != "softmax":
        raise VisrecError(f"--solver newton is for --method softmax, not {method}", "use --method softmax")
    t_start = time.perf_counter()
    ds = load_dataset(data, data_dir=data_dir, val_fraction=0.1, subset=subset, image_size=image_size)
    counts = ds.train.class_counts()
    empty = [ds.classes[i] for i, n in enumerate(counts) if n == 0]
    if empty:
        raise VisrecError(f"classes without training examples: {', '.join(empty)}",
                          "add examples of every class, or remove the empty class folders")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ftr, fval, fte = (extract(s.images, features) for s in (ds.train, ds.val, ds.test))
    timings["features"] = time.perf_counter() - t0
    ytr, yval, yte = ds.train.labels, ds.val.labels, ds.test.labels
    c = ds.num_classes
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"baseline-{source_label(ds.name)}-{method}-{features.replace('+', '_')}-{stamp}"
    run = Path(out) if out else Path("runs") / name
    run.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"method": method, "features": features, "dataset": ds.name,
                               "feature_dim": ftr.shape[1], "n_train": len(ytr), "n_val": len(yval),
                               "n_test": len(yte)}
    t0 = time.perf_counter()
    if method == "knn":
        ks = sorted(set(ks or [1, 3, 5, 10]))
        xall, yall = torch.cat([ftr, fval]), torch.cat([ytr, yval])
        if max(ks) > len(xall):
            raise VisrecError(f"k={max(ks)} is larger than the training set ({len(xall)} examples)",
                              f"use --k values up to {len(xall)}")
        if len(ks) > 1:
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(xall), generator=g)[:cv_examples]
            cv = cross_validate_k(xall[pick], yall[pick], ks, folds, metric, seed, c)
            best = cv.best_k
            summary["cv"] = {"folds": folds, "examples": len(pick), "table": cv.table()}
            _plot_cv(cv, metric, run / "cv.png")
        else:
            best = ks[0]
        timings["select"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        shape = tuple(ds.train.images.shape[1:]) if features == "raw" else None  # for tighter L1 bounds
        pred = KNN(metric, image_shape=shape).fit(xall, yall, c).predict(fte, best)
        timings["predict"] = time.perf_counter() - t1
        summary.update(k=best, metric=metric)
    else:
        ftr, fval, fte = standardize(ftr, fval, fte)
        lrs, regs = lrs or DEFAULT_LRS[method], regs or DEFAULT_REGS[method]
        if solver == "newton":
            lrs = [1.0]  # Newton's step has no learning rate (a line search scales it)

        def make(lr, reg, n_epochs):
            if solver == "newton":
                return LinearClassifier(method, reg=reg).fit_newton(ftr, ytr, c)
            if method == "twolayer":
                return TwoLayerNet(hidden=hidden, reg=reg).fit(ftr, ytr, c, lr=lr, epochs=n_epochs,
                                                               batch_size=batch_size, seed=seed)
            return LinearClassifier(method, reg=reg).fit(ftr, ytr, c, lr=lr, epochs=n_epochs,
                                                          batch_size=batch_size, seed=seed)

        grid = []
        for lr, reg in itertools.product(lrs, regs):
            try:
                m = make(lr, reg, search_epochs)
                val = (m.predict(fval) == yval).float().mean().item()
            except VisrecError:  # a setting that blows up is a bad setting, not a failed search
                val = float("nan")
            grid.append({"lr": lr, "reg": reg, "val_acc": val})
        ok = [gr for gr in grid if math.isfinite(gr["val_acc"])]
        if not ok:
            raise VisrecError(f"every setting of the search diverged (lr {lrs}, reg {regs})", "try smaller --lr values")
        best = max(ok, key=lambda gr: gr["val_acc"])
        timings["select"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = make(best["lr"], best["reg"], epochs)
        timings["train"] = time.perf_counter() - t1
        pred = model.predict(fte)
        summary.update(lr=best["lr"], reg=best["reg"], search=grid, epochs=epochs,
                       val_acc=(model.predict(fval) == yval).float().mean().item())
        if method == "twolayer":
            summary["hidden"] = hidden
        summary["solver"] = solver
        if solver == "newton":
            summary.update(newton_steps=len(model.history), newton_losses=model.history,
                           newton_step_seconds=[round(v, 4) for v in model.step_seconds])
        if (solver == "sgd" and best["lr"] in (min(lrs), max(lrs))) or best["reg"] in (min(regs), max(regs)):
            summary["warning"] = ("the best setting is at the edge of the searched range: widen --lr / --reg "
                                  "in that direction")
        if method != "twolayer" and features == "raw":
            _plot_templates(model.W, (ds.channels, *ds.image_size), ds.classes, run / "templates.png")
    result = EvalResult.from_predictions(pred, yte, ds.classes)
    result.save(run)
    summary.update(test_acc=result.acc, seconds=round(time.perf_counter() - t_start, 3),
                   timings={k: round(v, 3) for k, v in timings.items()}, run=str(run))
    write_json(run / "summary.json", summary)
    return summary
