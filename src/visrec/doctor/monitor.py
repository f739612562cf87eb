"""Training monitors: activation, gradient and update statistics, sampled every N optimizer steps.

`TrainingMonitor` is an observer (a Callback): it registers PyTorch hooks on the optimizer (step pre-
and post-hooks) and, only for the sampled steps, forward hooks on the activation layers. Between
samples the cost is two Python calls per step; at a sample it clones the weights and reduces each
activation to a handful of numbers. It never changes what the loop computes.

What it records per sample, per layer:
- activations (after each activation module): mean, std, the fraction of dead units (ReLU family:
  a channel/feature that is <= 0 for every input of the batch) and of saturated values (tanh:
  |y| > 0.99; sigmoid: y < 0.01 or y > 0.99), and a 30-bin histogram;
- weights (parameters with 2+ dims): gradient norm, weight norm, and the update/weight ratio
  ||w_after - w_before|| / ||w_before|| of that step (the course's rule of thumb: about 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import write_json
from ..training.callbacks import Callback, TrainState
from .findings import Diagnosis, Finding

RELU_FAMILY = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.RReLU, nn.Hardswish)
SATURATING = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid)


def activation_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are activations: every ReLU-family and saturating module, in order.

    Models that call activations as functions have none; then the outputs of the parameterized leaf
    layers (Linear, Conv) are watched instead, for mean and std only.
    """
    acts = [(n, m) for n, m in model.named_modules() if isinstance(m, RELU_FAMILY + SATURATING)]
    if acts:
        return acts
    return [(n, m) for n, m in model.named_modules()
            if not list(m.children()) and any(p.dim() >= 2 for p in m.parameters(recurse=False))]


def watched_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every activation layer (see `activation_layers`); kind: relu, tanh, sigmoid, linear."""
    return [(name or "input", m, _kind(m)) for name, m in activation_layers(model)]


def watch_activations(layers: list[tuple[str, nn.Module, str]], store: dict[str, Any]) -> list[Any]:
    """Forward hooks that put the statistics of each layer's first output into `store[name]`.

    Returns the hook handles; remove them to stop watching."""
    def make(name: str, kind: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and name not in store:
                store[name] = activation_stats(output, kind)
        return hook

    return [m.register_forward_hook(make(name, kind)) for name, m, kind in layers]


def _kind(m: nn.Module) -> str:
    if isinstance(m, (nn.Tanh, nn.Hardtanh)):
        return "tanh"
    if isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)):
        return "sigmoid"
    if isinstance(m, RELU_FAMILY):
        return "relu"
    return "linear"


@torch.no_grad()
def activation_stats(y: torch.Tensor, kind: str) -> dict[str, Any]:
    y = y.detach().float()
    flat = y.flatten()
    s: dict[str, Any] = {"kind": kind, "mean": flat.mean().item(),
                         "std": flat.std().item() if flat.numel() > 1 else 0.0}
    if kind == "relu" and y.dim() >= 2:
        per_unit = y.transpose(0, 1).reshape(y.shape[1], -1)  # (units, batch * positions)
        s["dead"] = (per_unit.amax(1) <= 0).float().mean().item()
    if kind == "tanh":
        s["saturated"] = (flat.abs() > 0.99).float().mean().item()
    elif kind == "sigmoid":
        s["saturated"] = ((flat < 0.01) | (flat > 0.99)).float().mean().item()
    lo, hi = flat.min().item(), flat.max().item()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        s["hist"] = None
    else:
        hi = hi if hi > lo else lo + 1e-6
        s["hist"] = {"lo": lo, "hi": hi, "counts": torch.histc(flat, 30, lo, hi).long().tolist()}
    return s


class TrainingMonitor(Callback):
    """Samples the network's statistics every `every` optimizer steps and turns them into findings.

    Attach with `visrec.train(..., callbacks=[TrainingMonitor()])` or `visrec train --monitor`. At the
    end of training it writes `monitor.json` (all samples), `findings.json`, `doctor.md` and the
    plots into the run folder, and prints the findings.
    """

    def __init__(self, every: int | None = None, *, console=None, write: bool = True, title: str | None = None,
                 gap: bool = True):
        self.every = every
        self.gap = gap
        self.console = console
        self.write = write
        self.title = title
        self.samples: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.diagnosis: Diagnosis | None = None
        self._handles: list[Any] = []
        self._act_handles: list[Any] = []
        self._count = 0
        self._pending: dict[str, Any] | None = None
        self._before: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ hooks

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, start_step: int = 0) -> None:
        self.model = model
        self.optimizer = optimizer
        self.weights = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
        self.acts = watched_layers(model)
        self._count = start_step
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        if self._count % self.every == 0:
            self._arm()

    def detach(self) -> None:
        for h in self._handles + self._act_handles:
            h.remove()
        self._handles, self._act_handles = [], []

    def _arm(self) -> None:
        """Start a sample: the next forward pass records activation statistics."""
        self._pending = {"step": self._count + 1, "acts": {}}
        self._act_handles = watch_activations(self.acts, self._pending["acts"])

    def _pre(self, optimizer, args, kwargs) -> None:
        if self._pending is None:
            return
        for h in self._act_handles:
            h.remove()
        self._act_handles = []
        grads = {}
        with torch.no_grad():
            for name, p in self.weights:
                g = p.grad
                grads[name] = {"grad_norm": g.float().norm().item() if g is not None else 0.0,
                               "weight_norm": p.float().norm().item()}
            self._before = {name: p.detach().float().clone() for name, p in self.weights}
        self._pending["layers"] = grads

    def _post(self, optimizer, args, kwargs) -> None:
        self._count += 1
        if self._pending is not None and "layers" in self._pending:
            with torch.no_grad():
                for name, p in self.weights:
                    before = self._before[name]
                    rec = self._pending["layers"][name]
                    upd = (p.detach().float() - before).norm().item()
                    rec["update_norm"] = upd
                    rec["ratio"] = upd / rec["weight_norm"] if rec["weight_norm"] > 0 else float("inf") if upd else 0.0
            self._pending["lr"] = optimizer.param_groups[0]["lr"]
            self.samples.append(self._pending)
            self._pending, self._before = None, {}
        if self._count % self.every == 0:
            self._arm()

    # ------------------------------------------------------------------ callback events

    def on_train_start(self, state: TrainState) -> None:
        if self.every is None:
            self.every = max(1, min(50, state.total_steps // 20))
        if state.optimizer is None:
            raise ValueError("TrainingMonitor needs the optimizer in the training state")
        self.attach(state.model, state.optimizer, start_step=state.step)

    def on_window(self, state, record):
        self.windows.append(dict(record))

    def on_epoch_end(self, state, records):
        self.epochs.extend(dict(r) for r in records)

    def on_train_end(self, state, summary):
        self.detach()
        self.summary = dict(summary)
        findings = monitor_findings(self.samples, self.windows, self.epochs if self.gap else [], self.summary)
        self.diagnosis = Diagnosis(findings, title=self.title or f"visrec monitor: {state.run_dir.name}")
        if self.write:
            self.save(state.run_dir)
        if self.console is not None:
            self.console.print("[bold]training monitor[/bold]")
            self.diagnosis.print(self.console)

    def save(self, run_dir: Path) -> list[str]:
        from .plots import plot_monitor

        write_json(run_dir / "monitor.json", {"every": self.every, "samples": self.samples})
        plots = plot_monitor(self, run_dir / "plots")
        if self.diagnosis is not None:
            from ..io import write_text

            write_text(run_dir / "findings.json", self.diagnosis.to_json() + "\n")
            rel = [str(Path(p).relative_to(run_dir)) for p in plots]
            write_text(run_dir / "doctor.md", self.diagnosis.to_markdown(rel))
        return plots


# ---------------------------------------------------------------------- rules


def _median(xs: Sequence[float]) -> float:
    xs = sorted(x for x in xs if math.isfinite(x))
    return xs[len(xs) // 2] if xs else float("nan")


def layer_findings(samples: list[dict[str, Any]]) -> list[Finding]:
    """Dead and saturated units, vanishing and exploding gradients, from the sampled statistics."""
    out: list[Finding] = []
    if not samples:
        return out
    last = samples[-1]
    acts = last.get("acts", {})
    dead = {n: round(a["dead"], 3) for n, a in acts.items() if "dead" in a}
    if dead:
        worst = max(dead.values())
        sev = "error" if worst >= 0.9 else "warn" if worst >= 0.4 else "info" if worst >= 0.15 else None
        if sev:
            bad = {n: v for n, v in dead.items() if v >= 0.15}
            out.append(Finding(
                "dead-units", sev,
                f"{worst:.0%} of the units in layer {max(dead, key=dead.get)!r} never activate (output <= 0 for "
                f"every input of the batch); dead units pass no gradient and never recover",
                {"dead_fraction_by_layer": bad, "step": last["step"]},
                "lower the learning rate (a too-large update kills ReLUs), initialize biases at 0 (or slightly "
                "positive) with He (kaiming) weights, put batch norm before the activation, or use leaky ReLU "
                "(visrec's models: --set model.kwargs.act=leaky_relu)",
            ))
    sat = {n: round(a["saturated"], 3) for n, a in acts.items() if "saturated" in a}
    if sat:
        med = {n: _median([s["acts"][n]["saturated"] for s in samples if n in s.get("acts", {})]) for n in sat}
        worst = max(med.values())
        sev = "error" if worst >= 0.5 else "warn" if worst >= 0.2 else "info" if worst >= 0.05 else None
        if sev:
            out.append(Finding(
                "saturated-units", sev,
                f"{worst:.0%} of the activations in layer {max(med, key=med.get)!r} sit at the tanh/sigmoid limits, "
                f"where the local gradient is ~0: those units learn almost nothing",
                {"saturated_fraction_by_layer": {n: round(v, 3) for n, v in med.items() if v >= 0.05}},
                "initialize the weights smaller (Xavier/Glorot: std = 1/sqrt(fan_in)), normalize the input, add "
                "batch norm, or switch to ReLU (--set model.kwargs.act=relu)",
            ))
    # Vanishing activations: the std collapses through depth (the course's tanh + tiny init demo).
    first = samples[0]
    stds = [(n, a["std"]) for n, a in first.get("acts", {}).items()]
    if len(stds) >= 3 and stds[0][1] > 0:
        ratio = stds[-1][1] / stds[0][1]
        if ratio < 1e-2:
            out.append(Finding(
                "vanishing-gradients", "error" if ratio < 1e-4 else "warn",
                f"activations shrink from std {stds[0][1]:.3g} in {stds[0][0]!r} to {stds[-1][1]:.3g} in "
                f"{stds[-1][0]!r} ({ratio:.1e}x): the signal, and with it the gradient, vanishes with depth",
                {"activation_std_by_layer": {n: float(f"{s:.3g}") for n, s in stds}},
                "initialize so that activations keep unit variance (Xavier for tanh, He/kaiming for ReLU), add "
                "batch norm, or use a shallower network or residual connections",
            ))
    # Gradient scale by depth: relative gradient |g|/|w| of the first weight layer against the last.
    rel = []
    for s in samples:
        layers = [(n, v) for n, v in s.get("layers", {}).items() if v["weight_norm"] > 0]
        if len(layers) >= 2:
            g0 = layers[0][1]["grad_norm"] / layers[0][1]["weight_norm"]
            g1 = layers[-1][1]["grad_norm"] / layers[-1][1]["weight_norm"]
            rel.append((g0, g1, layers[0][0], layers[-1][0]))
    if rel:
        g0 = _median([r[0] for r in rel])
        g1 = _median([r[1] for r in rel])
        ev = {"first_layer": rel[0][2], "last_layer": rel[0][3], "rel_grad_first": g0, "rel_grad_last": g1}
        if not any(f.id == "vanishing-gradients" for f in out) and g1 > 0 and g0 / g1 < 1e-3:
            out.append(Finding(
                "vanishing-gradients", "error" if g0 / g1 < 1e-5 else "warn",
                f"the first layer's gradient (relative to its weights) is {g0 / g1:.1e} of the last layer's: the early "
                f"layers barely learn",
                ev, "use He/Xavier initialization, batch norm, ReLU instead of tanh/sigmoid, or residual connections",
            ))
        worst_abs = max((v["grad_norm"] / v["weight_norm"] for s in samples for v in s.get("layers", {}).values()
                         if v["weight_norm"] > 0), default=0.0)
        if (g1 > 0 and g0 / g1 > 1e3) or not math.isfinite(worst_abs) or worst_abs > 1e2:
            out.append(Finding(
                "exploding-gradients", "error" if not math.isfinite(worst_abs) or worst_abs > 1e4 else "warn",
                f"gradients are huge relative to the weights (largest |g|/|w| = {worst_abs:.3g}) or grow toward the "
                f"input: steps will overshoot",
                {**ev, "max_rel_grad": worst_abs},
                "clip the gradient norm (--set optim.grad_clip=1.0), lower the learning rate, normalize the input, "
                "or add batch norm",
            ))
    return out


def update_ratio(samples: list[dict[str, Any]]) -> float:
    """The median over layers of update/weight ratio, at the sample where it was largest."""
    meds = [_median([v.get("ratio", float("nan")) for v in s.get("layers", {}).values()]) for s in samples]
    meds = [m for m in meds if math.isfinite(m)]
    return max(meds) if meds else float("nan")


def loss_findings(windows: list[dict[str, Any]], summary: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    err = summary.get("error") or ""
    if summary.get("status") == "failed" and "non-finite" in err:
        out.append(Finding(
            "non-finite-loss", "error", "the loss became NaN or infinite and training stopped",
            {"error": err.split(";")[0], "steps_done": summary.get("steps")},
            "lower the learning rate (try 10x lower), clip gradients (--set optim.grad_clip=1.0), normalize the "
            "input (--set data.normalize=channel), and make sure the model returns logits (no softmax)",
        ))
    losses = [w["loss"] for w in windows if w.get("loss") is not None and math.isfinite(w["loss"])]
    if len(losses) >= 4:
        lo, first, last = min(losses), losses[0], losses[-1]
        if last > 2 * lo and last > first:
            out.append(Finding(
                "loss-diverging", "warn",
                f"the loss climbed from its minimum {lo:.3g} to {last:.3g}: the optimization is unstable",
                {"loss_first": first, "loss_min": lo, "loss_last": last},
                "lower the learning rate or add warmup (--set schedule.warmup_epochs=1)",
            ))
        elif first > 0 and (first - lo) / first < 0.02:
            out.append(Finding(
                "loss-flat", "warn",
                f"the loss stayed at {first:.3g} (best {lo:.3g}) over {len(losses)} logging windows: nothing is "
                f"being learned",
                {"loss_first": first, "loss_min": lo, "windows": len(losses)},
                "raise the learning rate, check the initialization (no zero/constant weights), and that the "
                "labels match the images",
            ))
        diffs = [abs(b - a) for a, b in zip(losses[1:], losses[2:], strict=False)]
        level = _median(losses[1:])
        if level > 0 and diffs and _median(diffs) / level > 0.25:
            out.append(Finding(
                "loss-noisy", "info",
                f"the loss jumps by {_median(diffs) / level:.0%} of its level between windows",
                {"median_jump": _median(diffs), "loss_level": level},
                "a larger batch (--batch-size) or a lower learning rate smooths it",
            ))
    return out


DATA_BOUND_SHARE = 0.2  # the step waits on data more than this share of the time: the data path is the bottleneck


def data_findings(windows: list[dict[str, Any]], summary: dict[str, Any]) -> list[Finding]:
    """`data-bound`: the training step waited on its batches more than DATA_BOUND_SHARE of the time (the first window,
    which starts the worker processes, is left out), with the fix that fits how the data was read."""
    shares = [w["data_share"] for w in windows[1:] if isinstance(w.get("data_share"), int | float)]
    if len(shares) < 2:
        return []
    share = sum(shares) / len(shares)
    ev = {"data_share": round(share, 4), "windows": len(shares)}
    source = summary.get("data_input") or {}
    ev.update({k: source[k] for k in ("cache", "workers") if k in source})
    if share <= DATA_BOUND_SHARE:
        return [Finding("data-bound", "ok", f"the step waited on data {share:.0%} of the time", ev)]
    if source.get("cache") == "none":
        fix = (f"more worker processes (--set data.workers=N; now {source.get('workers', '?')}), the decoded cache "
               "on disk (--set data.cache=disk: decoded once, then read without decoding), or smaller originals "
               "(photos resized once to about twice data.image_size decode several times faster)")
    else:
        fix = ("a faster disk or the decoded cache (--set data.cache=disk), more CPU threads for the data, or a "
               "larger batch so each step does more work per batch read")
    return [Finding("data-bound", "warn", f"the training step waited on data {share:.0%} of the time: the data "
                    "path, not the model, sets the pace", ev, fix)]


def gap_findings(train_acc: float | None, val_acc: float | None, num_classes: int | None,
                 train_label: str = "training accuracy") -> list[Finding]:
    if train_acc is None or val_acc is None:
        return []
    gap = train_acc - val_acc
    ev = {"train_acc": round(train_acc, 4), "val_acc": round(val_acc, 4), "gap": round(gap, 4)}
    if gap > 0.15 and train_acc > 0.8:
        return [Finding(
            "overfitting", "error" if gap > 0.3 else "warn",
            f"{train_label} {train_acc:.1%} against validation {val_acc:.1%}: the model memorizes the training "
            f"set ({gap:.1%} gap)",
            ev, "more data or augmentation (--set data.augment=[hflip,crop:4]), stronger weight decay "
            "(--set optim.weight_decay=5e-3), dropout, a smaller model, or fewer epochs with train.select=best",
        )]
    chance = 1.0 / num_classes if num_classes else 0.0
    if num_classes and train_acc < chance + 0.5 * (1 - chance) and abs(gap) < 0.05:
        return [Finding(
            "underfitting", "info",
            f"{train_label} is only {train_acc:.1%} (chance {chance:.1%}) and validation matches it: if it "
            f"stays there, the model is too weak for the task",
            {**ev, "chance": round(chance, 4)},
            "train longer, raise the capacity (a wider/deeper model), or lower the regularization",
        )]
    return []


def monitor_findings(samples, windows, epochs, summary) -> list[Finding]:
    """Everything a monitored run can say about itself at its end."""
    out = loss_findings(windows, summary) + layer_findings(samples) + data_findings(windows, summary)
    ratio = update_ratio(samples)
    if math.isfinite(ratio) and ratio > 0.5:
        out.append(Finding(
            "lr-too-high", "warn",
            f"each step changes the weights by {ratio:.0%} of their norm (the rule of thumb is about 0.1%; "
            f"batch-norm networks tolerate about 10%)",
            {"update_weight_ratio": ratio}, "lower the learning rate about 10x (--lr)",
        ))
    elif math.isfinite(ratio) and 0 < ratio < 1e-6:
        out.append(Finding(
            "lr-too-low", "warn",
            f"each step changes the weights by only {ratio:.1e} of their norm (the rule of thumb is about 1e-3)",
            {"update_weight_ratio": ratio}, "raise the learning rate (--lr), 10x at a time",
        ))
    tr = [r for r in epochs if r["split"] == "train"]
    va = [r for r in epochs if r["split"] == "val"]
    if tr and va:
        out += gap_findings(tr[-1]["acc"], va[-1]["acc"], summary.get("num_classes"),
                            "training accuracy (augmented batches)")
    return out
