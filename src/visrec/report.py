"""report.html: one self-contained page per run that a person wants to read.

Sections: the headline numbers, timing, training curves (loss, accuracy, learning rate), the confusion matrix and
per-class accuracy, the most confused pairs with their images, the most confidently wrong images, first-layer
filters, Grad-CAM and saliency for test images of every class, the doctor's findings when the run has them, and
the config. Every image is an embedded PNG (data URI); the page has no scripts and loads nothing from anywhere.

    visrec report runs/fm          # regenerate RUN/report.html
    visrec.write_report("runs/fm")
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VisrecError
from .io import write_text
from .plotting import figure_png, pyplot
from .tasks import task_class
from .training.callbacks import Callback, format_metric, log_figures


@dataclass
class Report:
    path: Path
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG, also logged to TensorBoard
    skipped: list[str] = field(default_factory=list)  # sections left out, with the reason
    seconds: float = 0.0


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pct(x: Any) -> str:
    return f"{x:.2%}" if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def _secs(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "–"
    m, s = divmod(float(x), 60)
    return f"{int(m)} min {s:.0f} s" if m else f"{s:.1f} s"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash: the rest is still worth drawing
                continue
    return rows


def curves_png(metrics: list[dict[str, Any]], title: str, primary: str = "acc") -> bytes | None:
    """Loss, the primary metric (accuracy) and learning rate against epochs, train windows as thin lines, val
    epochs as dots."""
    train = [r for r in metrics if r.get("split") == "train" and r.get("kind") == "window"]
    val = [r for r in metrics if r.get("split") == "val"]
    if not train:
        return None
    steps_per_epoch = max(1, max(r["step"] for r in train) / max(1, max(r["epoch"] for r in train)))

    def ep(r):
        return r["step"] / steps_per_epoch

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, name in ((axes[0], "loss", "loss"), (axes[1], primary, "accuracy" if primary == "acc" else primary)):
        hidden = []  # a split's points that cannot be drawn (inf, NaN) are counted in the title, never dropped silently
        for rows, split, style in ((train, "train (windows)", {"lw": 1}), (val, "val", {"marker": "o", "ms": 4})):
            ys = [r.get(key) for r in rows]
            if not any(isinstance(y, int | float) for y in ys):
                continue  # no such metric for this split (a detector's training windows have no mAP): no legend entry
            ax.plot([ep(r) for r in rows], [y if isinstance(y, int | float) else math.nan for y in ys], label=split,
                    **style)
            bad = sum(isinstance(y, int | float) and not math.isfinite(y) for y in ys)
            if bad:
                hidden.append(f"{bad} {split.split()[0]} point{'s' * (bad > 1)} not finite")
        ax.set_xlabel("epoch")
        ax.set_title(name + (f" ({', '.join(hidden)})" if hidden else ""), fontsize=10 if hidden else None)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[2].plot([ep(r) for r in train], [r["lr"] for r in train], lw=1.2)
    axes[2].set_xlabel("epoch")
    axes[2].set_title("learning rate")
    axes[2].grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig, dpi=100)


def _read_csv(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.reader(f))


def per_class_png(rows: list[list[str]]) -> bytes:
    names = [r[0] for r in rows]
    accs = [float(r[2]) for r in rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1))
    ax.barh(range(len(names)), accs, color=["#c0392b" if a < sum(accs) / len(accs) - 0.05 else "#2e86c1"
                                            for a in accs])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    for i, a in enumerate(accs):
        ax.text(min(a, 0.98), i, f" {a:.1%}", va="center", ha="right" if a > 0.85 else "left", fontsize=7,
                color="white" if a > 0.85 else "black")
    ax.set_title("per-class accuracy (red: more than 5 points below the mean)", fontsize=9)
    return figure_png(fig, dpi=100)


CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dce3}
.sub{color:#5b6475;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #d8dce3;border-radius:8px;
padding:10px 14px;min-width:140px}.card b{display:block;font-size:22px}.card span{color:#5b6475;font-size:13px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d8dce3;padding:3px 9px;text-align:left;
font-size:13px}th{background:#eef0f4}
img{max-width:100%;background:#fff;border:1px solid #d8dce3;border-radius:4px;margin:4px 0}
pre{background:#fff;border:1px solid #d8dce3;padding:10px;overflow:auto;font-size:12px}
.finding{background:#fff;border-left:5px solid #888;padding:8px 12px;margin:8px 0}
.finding.error{border-color:#c0392b}.finding.warn{border-color:#e67e22}.finding.info{border-color:#2e86c1}
.finding.ok{border-color:#27ae60}.muted{color:#5b6475;font-size:13px}
"""


def _value(x: Any, metric: str) -> str:
    return format_metric(metric, x, "–")


def _cards(s: dict[str, Any]) -> str:
    p = s.get("primary_metric", "acc")
    name = "accuracy" if p == "acc" else p
    items = [(f"test {name}", _value(s.get(f"test_{p}"), p)), (f"best val {name}", _value(s.get(f"best_val_{p}"), p)),
             (f"train {name}", _value(s.get(f"train_{p}"), p)), ("training time", _secs(s.get("train_seconds"))),
             ("images / s", f"{s['images_per_s']:,.0f}" if isinstance(s.get("images_per_s"), (int, float)) else "–"),
             ("parameters", f"{s['params']:,}" if isinstance(s.get("params"), int) else "–")]
    return '<div class="cards">' + "".join(f'<div class="card"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>'
                                           for k, v in items) + "</div>"


def _train_above_val(cfg, records: list[dict[str, Any]]) -> str | None:
    """Why the training loss can sit above the validation loss, when it does: what training adds that
    evaluation does not."""
    train = [r for r in records if r.get("split") == "train" and r.get("kind") == "epoch"]
    val = [r for r in records if r.get("split") == "val"]
    if not train or not val or not train[-1].get("loss", 0) > val[-1].get("loss", float("inf")):
        return None
    causes = []
    if cfg.loss.name == "cross_entropy" and cfg.loss.label_smoothing > 0:
        causes.append(f"label smoothing ({cfg.loss.label_smoothing:g}) keeps the training loss above zero even for "
                      "perfect predictions, and validation is scored without it")
    if cfg.data.augment:
        causes.append(f"training images are augmented ({', '.join(cfg.data.augment)}), validation images are not")
    causes.append("the training loss of an epoch averages over weights that were still improving, and dropout or "
                  "batch statistics differ between training and evaluation")
    return "The training loss sits above the validation loss: " + "; ".join(causes) + ". This is expected, not a bug."


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _timing(s: dict[str, Any]) -> str:
    rows = [["training", _secs(s.get("train_seconds"))],
            ["epochs (steps)", f"{s.get('epochs', '–')} of {s.get('epochs_planned', '–')} ({s.get('steps', '–')})"],
            ["throughput", f"{s.get('images_per_s', 0):,.0f} images/s" if s.get("images_per_s") else "–"],
            ["device", f"{s.get('device', '–')}, {s.get('precision', '–')}, {s.get('threads', '–')} threads"
                       + (", channels_last" if s.get("channels_last") else "")],
            ["started / finished", f"{s.get('started', '–')} / {s.get('finished', '–')}"],
            ["software", f"visrec {s.get('visrec', '–')}, torch {s.get('torch', '–')}, python {s.get('python', '–')}"]]
    if isinstance(s.get("weights_compared"), dict):
        p = s.get("primary_metric", "acc")
        for name, v in s["weights_compared"].items():
            val, test = _value(v.get(f"val_{p}"), p), _value(v.get(f"test_{p}"), p)
            rows.append([f"{name} weights", f"val {val}, test {test}"])
    return _table(["measure", "value"], rows)


def _findings(run_dir: Path) -> str | None:
    path = run_dir / "findings.json"
    if not path.is_file():
        return None
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError:
        return '<p class="muted">findings.json could not be read.</p>'
    if isinstance(items, dict):
        items = items.get("findings", [])
    out = []
    for f in items:
        sev = str(f.get("severity", "info"))
        if sev == "ok":
            continue
        fix = f.get("fix") or ""
        ev = f.get("evidence") or {}
        evidence = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in ev.items()
                             if not isinstance(v, (list, dict)))
        out.append(f'<div class="finding {_esc(sev)}"><b>{_esc(sev.upper())} · {_esc(f.get("id", ""))}</b><br>'
                   f'{_esc(f.get("message", ""))}'
                   + (f"<br><i>What to change:</i> {_esc(fix)}" if fix else "")
                   + (f'<br><span class="muted">{_esc(evidence)}</span>' if evidence else "") + "</div>")
    return "".join(out) or '<p class="muted">The doctor found nothing wrong.</p>'


def _per_class_examples(test, classes: list[str], per_class: int):
    """`per_class` test images of every class (at most 10 classes shown)."""
    import torch

    idx = []
    for c in range(min(10, len(classes))):
        idx += torch.nonzero(test.labels == c).flatten()[:per_class].tolist()
    return test.images[idx]


def build_report(run, out: str | Path | None = None, *, explain: bool = True, per_class: int = 2) -> Report:
    """Write `run`'s report.html (default RUN/report.html); `explain=False` leaves out the sections that need the
    model and the data (confused images, errors, filters, Grad-CAM, saliency)."""
    from .runs import Run

    t0 = time.perf_counter()
    run = run if isinstance(run, Run) else Run(run)
    d = run.path
    summary_path = d / "summary.json"
    s = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rep = Report(Path(out) if out else d / "report.html")
    parts: list[str] = []
    status = s.get("status", "no summary yet")
    parts.append(f"<h1>{_esc(d.name)}</h1><p class='sub'>{_esc(s.get('model', run.config.model.name))} on "
                 f"{_esc(s.get('dataset', run.config.data.name))} — status: <b>{_esc(status)}</b>"
                 + (f" — {_esc(s['error'])}" if s.get("error") else "") + "</p>")
    parts.append(_cards(s))
    if s.get("warnings"):
        parts.append("<h2>Warnings</h2>" + "".join(f"<div class='finding warn'>{_esc(w)}</div>"
                                                   for w in s["warnings"]))

    curves = curves_png(read_metrics(d / "metrics.jsonl"), f"{d.name}: training curves",
                        s.get("primary_metric", "acc"))
    parts.append("<h2>Training curves</h2>")
    if curves:
        rep.figures["curves"] = curves
        parts.append(_img(curves, "training curves"))
        why = _train_above_val(run.config, read_metrics(d / "metrics.jsonl"))
        if why:
            parts.append(f"<p class='muted'>{_esc(why)}</p>")
    else:
        parts.append('<p class="muted">No training windows were logged.</p>')

    parts.append("<h2>Test results</h2>")
    if (d / "confusion.png").is_file():
        rep.figures["confusion"] = (d / "confusion.png").read_bytes()
        parts.append(_img(rep.figures["confusion"], "confusion matrix"))
    per = _read_csv(d / "per_class.csv")[1:]
    if per:
        rep.figures["per_class"] = per_class_png(per)
        parts.append(_img(rep.figures["per_class"], "per-class accuracy"))
        parts.append(_table(["class", "test images", "accuracy"], [[r[0], r[1], _pct(float(r[2]))] for r in per]))
    if s.get("most_confused"):
        parts.append("<p>Most confused (true → predicted, count):</p>"
                     + _table(["true", "predicted", "count"], [list(r) for r in s["most_confused"]]))
    classification = task_class(run.config.task.name).class_scores  # class figures and tables
    if not per and classification:
        parts.append('<p class="muted">The run has no test evaluation yet.</p>')
    if s.get("test") and not classification:
        parts.append(_table(["metric", "test"], [[k, _value(v, k)] for k, v in s["test"].items()
                                                 if isinstance(v, (int, float))]))

    if explain:
        parts += _preprocessing_section(run, rep)
    if explain and not classification:
        parts += _task_sections(run, rep)
        rep.skipped.append(f"explanations (Grad-CAM, saliency, filters): written for classification runs, and this "
                           f"run's task is {s.get('task')}")
    elif explain:
        parts += _explain_sections(run, rep, per_class)

    parts.append("<h2>Doctor</h2>")
    found = _findings(d)
    parts.append(found or '<p class="muted">This run was not watched by the doctor (train with --monitor, or run '
                 '<code>visrec doctor</code>).</p>')
    parts.append("<h2>Timing</h2>" + _timing(s))
    config = (d / "config.yaml").read_text() if (d / "config.yaml").is_file() else ""
    parts.append(f"<h2>Config</h2><pre>{_esc(config)}</pre>")
    if rep.skipped:
        parts.append("<h2>Left out</h2><ul>" + "".join(f"<li>{_esc(x)}</li>" for x in rep.skipped) + "</ul>")
    parts.append(f'<p class="muted">Written by visrec {_esc(s.get("visrec", ""))} on '
                 f'{time.strftime("%Y-%m-%d %H:%M:%S")}.</p>')
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>visrec report: {_esc(d.name)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(parts) + "</main></body></html>\n")
    write_text(rep.path, page)
    rep.seconds = time.perf_counter() - t0
    return rep


def _task_sections(run, rep: Report) -> list[str]:
    """A task's own figures (boxes, class maps), drawn by the task on the run's test images."""
    from .runs import remap_classes
    from .tasks import task_of_run

    try:
        task, ds = task_of_run(run)
        lm = run.load_model()
        figures = task.figures(lm.model, remap_classes(ds.test, lm.classes), lm.normalizer, folder=run.path)
    except (VisrecError, OSError) as e:
        rep.skipped.append(f"the {run.config.task.name} figures: {getattr(e, 'message', e)}")
        return []
    parts = []
    for i, (title, png) in enumerate(figures.items()):
        rep.figures[f"task{i}"] = png
        parts.append(f"<h2>{_esc(title.split(':')[0])}</h2><p class='muted'>{_esc(title)}</p>" + _img(png, title))
    return parts


def whitening_png(normalizer, images, n: int = 8) -> bytes:
    """The fitted whitening of a run: its eigenvalue spectrum, its top components as images, and `n` training
    images before and after (zca: the whitened image; pca: the image rebuilt from the k components kept)."""
    import torch

    plt = pyplot()
    f, t = normalizer.whitening, normalizer.tensors
    c, h, w = f["shape"]
    comps = t["components"].cpu()[:16]
    x8 = images[:n].cpu()
    flat = x8.reshape(len(x8), -1).float() / 255.0 - t["mean"].cpu()
    if normalizer.mode == "zca":
        after = normalizer.to("cpu")(x8).reshape(len(x8), -1)
        after_title = "after zca"
    else:
        u = t["components"].cpu() if f["k"] <= len(t["components"]) else None
        if u is None:  # more components kept than stored for figures: rebuild from the pca basis itself
            u = torch.nn.functional.normalize(t["basis"].cpu(), dim=1)
        after = (flat @ u.t()) @ u
        after_title = f"rebuilt from {len(u)} components"

    def show(ax, v):
        img = v.reshape(c, h, w).permute(1, 2, 0).numpy()
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo + 1e-12)
        ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None)
        ax.axis("off")

    cols = max(len(comps), n)
    fig = plt.figure(figsize=(max(8.0, cols * 0.9), 6.4))
    grid = fig.add_gridspec(4, cols, height_ratios=[1.6, 1, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    ev = t["eigenvalues"].cpu().numpy()
    share = ev.cumsum() / max(ev.sum(), 1e-30)
    ax.plot(range(1, len(ev) + 1), share, color="tab:blue")
    ax.axvline(f["k"], color="tab:red", lw=1)
    ax.set(xscale="log", xlabel="components", ylabel="variance kept",
           title=f"data.normalize={normalizer.mode}: k={f['k']} of {len(ev)} components keep "
                 f"{100 * f['explained']:.1f}% of the variance (eps={f['eps']:g})")
    for i in range(len(comps)):
        show(fig.add_subplot(grid[1, i]), comps[i])
    for i in range(len(x8)):
        show(fig.add_subplot(grid[2, i]), flat[i])
        show(fig.add_subplot(grid[3, i]), after[i])
    fig.text(0.01, 0.52, "top components", fontsize=8)
    fig.text(0.01, 0.27, "training images (mean removed)", fontsize=8)
    fig.text(0.01, 0.02, after_title, fontsize=8)
    return figure_png(fig)


def _preprocessing_section(run, rep: Report) -> list[str]:
    """The whitening a run fitted (data.normalize=pca|pca_whiten|zca); nothing for the other modes."""
    if run.config.data.normalize not in ("pca", "pca_whiten", "zca"):
        return []
    from .runs import dataset_from_config

    try:
        lm = run.load_model()
        images = dataset_from_config(run.config).train.images
        rep.figures["whitening"] = whitening_png(lm.normalizer, images)
    except (VisrecError, OSError) as e:
        rep.skipped.append(f"the whitening figure: {getattr(e, 'message', e)}")
        return []
    return ["<h2>Preprocessing</h2><p class='muted'>The whitening fitted on the training split: how much variance "
            "the kept components hold, the top components, and training images before and after.</p>"
            + _img(rep.figures["whitening"], "whitening")]


def _explain_sections(run, rep: Report, per_class: int) -> list[str]:
    """Sections drawn with the model and the test split; each one that fails is listed under "Left out"."""
    from .explain.run import _confused, _errors, filters_figure, maps_figure, test_predictions

    parts: list[str] = []
    try:
        lm = run.load_model()
        predictions = test_predictions(run, lm)
        x8 = _per_class_examples(predictions[0], lm.classes, per_class)
    except (VisrecError, OSError) as e:
        rep.skipped.append(f"explanations: {getattr(e, 'message', e)}")
        return parts
    folder = run.path / "explain"
    for name, title, fn in (
        ("confused", "Most confused pairs", lambda: _confused(run, lm, folder, 8, predictions=predictions)),
        ("errors", "Most confidently wrong", lambda: _errors(run, lm, folder, 16, predictions=predictions)),
    ):
        try:
            ex = fn()
            if not len(ex.images):
                parts.append(f"<h2>{title}</h2><p class='muted'>No test image was misclassified.</p>")
                continue
            rep.figures[name] = ex.files[0].read_bytes()
            parts.append(f"<h2>{title}</h2>" + _img(rep.figures[name], title))
        except VisrecError as e:
            rep.skipped.append(f"{title.lower()}: {e.message}")
    try:
        rep.figures["filters"] = filters_figure(lm.model)
        parts.append("<h2>First-layer filters</h2>" + _img(rep.figures["filters"], "first-layer filters"))
    except VisrecError as e:
        rep.skipped.append(f"filters: {e.message}")
    import torch

    from .explain import Explanation, attribute

    x = lm.normalizer(x8)
    net, pixels = lm.model, x
    if lm.normalizer.whitening:  # saliency over the pixels: the network behind its whitening, fed pixel values
        net = torch.nn.Sequential(lm.normalizer.module().to(x.device), lm.model).eval()
        pixels = x8.to(x.device).float()
    with torch.no_grad():
        probs = lm.model(x).softmax(1)
    pred = probs.argmax(1)
    parts.append(f"<h2>What the model looks at</h2><p class='muted'>{per_class} test image(s) of each class, maps "
                 "for the predicted class (its probability above each image).</p>")
    for method in ("gradcam", "saliency"):
        try:
            maps = (attribute(method, lm.model, x, pred) if method == "gradcam"
                    else attribute(method, net, pixels, pred))
        except VisrecError as e:
            rep.skipped.append(f"{method}: {e.message}")
            continue
        ex = Explanation(method, x8, pred.tolist(), probs.gather(1, pred[:, None])[:, 0].tolist(), maps)
        rep.figures[method] = maps_figure(ex, lm.classes)
        parts.append(_img(rep.figures[method], method))
    return parts


def write_report(run, out: str | Path | None = None, *, explain: bool = True) -> Path:
    return build_report(run, out, explain=explain).path


class ReportWriter(Callback):
    """An observer that writes report.html when a run completes with a test evaluation, and logs its figures to
    TensorBoard. A report that cannot be drawn prints a warning: the trained model and its results are already
    safe on disk, so it never fails the run."""

    def on_train_end(self, state, summary: dict[str, Any]) -> None:
        import sys

        if summary.get("status") != "completed" or not summary.get("test"):
            return
        try:
            rep = build_report(state.run_dir)
        except Exception as e:  # noqa: BLE001
            print(f"visrec: report.html was not written: {type(e).__name__}: {e} "
                  f"(retry with `visrec report {state.run_dir}`)", file=sys.stderr)
            return
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(state.run_dir / "tb"))
        log_figures(writer, {k: v for k, v in rep.figures.items()
                             if k in ("filters", "gradcam", "saliency", "confusion")}, state.step)
        writer.close()
