"""Results: the trial table, the best trial, results.json/csv and figures, the final retraining, and `tune()`."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, resolve_config
from ..errors import VisrecError
from ..io import write_bytes, write_json, write_text, write_yaml
from ..runs import Run
from .space import Param, _unhashable, edge_warnings, noise_warning, task_class
from .study import StudySpec, create_study, open_stage
from .worker import run_workers, trial_config


def trial_rows(spec: StudySpec) -> list[dict[str, Any]]:
    rows = []
    for stage in spec.stages:
        for t in open_stage(spec, stage).get_trials(deepcopy=False):
            if t.user_attrs.get("unqueued"):
                continue
            rows.append({
                "stage": t.user_attrs.get("stage", ""), "number": t.number, "state": t.state.name,
                "value": t.value, "epochs": t.user_attrs.get("epochs"),
                "seconds": round(t.duration.total_seconds(), 2) if t.duration else None,
                "retry_of": t.system_attrs.get("failed_trial"), "stopped": t.user_attrs.get("stopped", ""),
                "run": t.user_attrs.get("run", ""), **{k: _unhashable(v) for k, v in t.params.items()},
            })
    return rows


def best_trial(spec: StudySpec) -> dict[str, Any] | None:
    """The best complete trial of the last stage (coarse trials ran fewer epochs and are not comparable)."""
    rows = [r for r in trial_rows(spec) if r["state"] == "COMPLETE" and r["stage"] != "coarse"]
    return max(rows, key=lambda r: r["value"] if spec.objective()[1] else -r["value"]) if rows else None


def write_results(spec: StudySpec) -> dict[str, Any]:
    """trials.csv, best.yaml (a preset), results.json and plots in the study folder."""
    folder = Path(spec.folder)
    rows = trial_rows(spec)
    params = spec.params()
    metric, maximize = spec.objective()
    column = f"val_{metric}"  # each trial's value is the task's primary validation metric, named as such
    keys = ["stage", "number", "state", column, "epochs", "seconds", "retry_of", "stopped", "run",
            *[p.key for p in params]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({(column if k == "value" else k): json.dumps(v) if isinstance(v, list | dict) else v
                    for k, v in r.items()})
    write_text(folder / "trials.csv", buf.getvalue())
    best = best_trial(spec)
    result: dict[str, Any] = {"study": spec.name, "strategy": spec.strategy, "trials": len(rows),
                              "metric": column, "maximize": maximize, "states": {}, "best": None, "warnings": []}
    for r in rows:
        result["states"][r["state"]] = result["states"].get(r["state"], 0) + 1
    if best is not None:
        values = {p.key: best[p.key] for p in params if p.key in best}
        cfg = trial_config(spec, values, best["epochs"] or spec.epochs)
        cfg.log.every = Config.from_dict(copy.deepcopy(spec.base), "study config").log.every
        write_yaml(folder / "best.yaml", cfg.anchored().to_dict())
        result["best"] = {"number": best["number"], "stage": best["stage"], column: best["value"],
                          "params": values, "run": best["run"]}
        result["warnings"] = edge_warnings(params, values)
        if task_class(cfg.task.name).class_scores and best["run"] and (Path(best["run"]) / "summary.json").is_file():
            others = sorted((r for r in rows if r["state"] == "COMPLETE" and r["stage"] == best["stage"]
                             and r["number"] != best["number"]), key=lambda r: -r["value"])
            n_val = int(Run(best["run"]).summary.get("n_val") or 0)
            if w := noise_warning(best, others[0] if others else None, n_val):
                result["warnings"].append(w)
    write_json(folder / "results.json", result)
    if any(r["state"] == "COMPLETE" for r in rows):
        write_bytes(folder / "scatter.png", _scatter_png(rows, params, metric))
        write_bytes(folder / "progress.png", _progress_png(rows, metric, maximize))
    return result


def _axis(metric: str) -> tuple[str, float]:
    """The y label of a metric and the factor its values are drawn at (accuracy in percent)."""
    return ("val accuracy (%)", 100.0) if metric == "acc" else (f"val {metric}", 1.0)


def _scatter_png(rows: list[dict[str, Any]], params: list[Param], metric: str) -> bytes:
    from ..plotting import figure_png, pyplot

    plt = pyplot()
    done = [r for r in rows if r["state"] == "COMPLETE"]
    label, scale = _axis(metric)
    n = len(params)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(n / cols)), squeeze=False)
    for ax, p in zip(axes.flat, params, strict=False):
        stages = sorted({r["stage"] for r in done})
        for stage in stages:
            pts = [(r[p.key], r["value"]) for r in done if r["stage"] == stage and p.key in r]
            if p.kind == "categorical":
                labels = [json.dumps(c) if isinstance(c, list) else str(c) for c in p.choices]
                xs = [labels.index(json.dumps(x) if isinstance(x, list) else str(x)) for x, _ in pts]
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
            else:
                xs = [x for x, _ in pts]
            ax.scatter(xs, [y * scale for _, y in pts], s=18, alpha=0.8, label=stage)
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(stages) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{label.removesuffix(' (%)')} against each hyperparameter")
    fig.tight_layout()
    return figure_png(fig, dpi=100)


def _progress_png(rows: list[dict[str, Any]], metric: str, maximize: bool) -> bytes:
    from ..plotting import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    label, scale = _axis(metric)
    xs = list(range(1, len(done) + 1))
    ys = [r["value"] * scale for r in done]
    ax.scatter(xs, ys, s=16, label="trial")
    ax.plot(xs, (np.maximum if maximize else np.minimum).accumulate(ys), color="C1", label="best so far")
    ax.set_xlabel("completed trial")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig, dpi=100)


def final(spec: StudySpec, out: str | Path | None = None):
    """Retrain the best config and evaluate it on the test split, once."""
    from ..fit import Trainer

    folder = Path(spec.folder)
    if not (folder / "best.yaml").is_file():
        write_results(spec)
    if not (folder / "best.yaml").is_file():
        raise VisrecError(f"study {spec.name!r} has no completed trial to retrain")
    cfg = resolve_config(str(folder / "best.yaml"))
    if out is None:
        out, i = folder / "final", 2
        while (out / "config.yaml").exists():
            out, i = folder / f"final-{i}", i + 1
    return Trainer(cfg, out=out, quiet=True).fit()


def leaderboard(spec: StudySpec, top: int = 10) -> list[dict[str, Any]]:
    rows = [r for r in trial_rows(spec) if r["state"] == "COMPLETE"]
    sign = 1 if spec.objective()[1] else -1
    return sorted(rows, key=lambda r: (r["stage"] != "coarse" or len(spec.stages) == 1, sign * r["value"]),
                  reverse=True)[:top]


def tune(data: str, **kwargs) -> dict[str, Any]:
    """Create the study, run `workers` workers (default 1), write the results; returns results.json's content."""
    from ..distributed import env_world

    if env_world() > 1:
        raise VisrecError("visrec tune does not run under torchrun: a trial trains in one process",
                          "run the search in one process with --workers N, or start more workers on other machines "
                          "against the same --storage (PostgreSQL); train the chosen config with --nproc")
    workers = kwargs.pop("workers", 1)
    spec = create_study(data, **kwargs)
    run_workers(spec, workers)
    return write_results(spec)
