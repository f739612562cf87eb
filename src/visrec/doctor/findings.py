"""Findings: what the doctor concluded, with a stable id, a severity, the evidence in numbers and a fix.

Every id the doctor can emit is listed in `FINDINGS` with a one-line meaning; the README's table is
generated from it, and tests check that nothing outside it is ever emitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("ok", "info", "warn", "error")

# id -> what it means (the README's table of findings).
FINDINGS: dict[str, str] = {
    # data
    "single-class": "the training split has fewer than two classes: there is nothing to classify",
    "class-imbalance": "the largest class has many times the examples of the smallest",
    "input-not-normalized": "inputs reach the model far from mean 0 / std 1 (for example raw 0..255 pixels)",
    "train-test-overlap": "images of the test split also appear, byte for byte, in the training split",
    "constant-images": "some images are a single flat value (blank, black or corrupt)",
    "small-train-set": "few training images per class: expect overfitting without strong regularization",
    # model at initialization
    "bad-output": "the model does not return one score (logit) per class",
    "output-is-probabilities": "the model already applies softmax/sigmoid: the loss expects raw scores",
    "symmetric-init": "all weights of a layer start equal (e.g. zero), so its units never become different",
    "no-gradient": "parameters that never receive a gradient (detached, frozen or unused)",
    "initial-loss-off": "the loss at initialization is far from its chance value (ln C, or C-1 for the SVM)",
    "regularization-no-effect": "weight decay is configured but does not reach the weights",
    "gradient-check-failed": "a hand-written backward disagrees with finite differences",
    # optimization
    "cannot-overfit": "the model cannot drive the loss to ~0 on a few dozen examples",
    "lr-too-high": "the learning rate is above the range where the loss falls",
    "lr-too-low": "the learning rate is far below the range where the loss falls fastest",
    "lr-range-inconclusive": "the learning-rate range test saw the loss fall at no rate",
    "non-finite-loss": "the loss became NaN or infinite",
    "loss-diverging": "the loss rose well above its minimum during training",
    "loss-flat": "the loss barely moved during training",
    "loss-noisy": "the loss jumps a lot from one logging window to the next",
    "data-bound": "the training step waits on its data (reading, decoding) more than a fifth of the time",
    # inside the network
    "dead-units": "ReLU-family units that are never positive, for any input of a batch",
    "saturated-units": "tanh/sigmoid units stuck at their limits, where the gradient is ~0",
    "vanishing-gradients": "gradients (or activations) shrink by orders of magnitude toward the input",
    "exploding-gradients": "gradients grow by orders of magnitude, or become huge",
    # generalization
    "overfitting": "training accuracy far above validation accuracy",
    "underfitting": "training accuracy itself stays low: the model (or training) is too weak",
    "labels-not-learnable": "validation accuracy stays at chance while optimization works: labels look random",
    "small-val-set": "too few validation images to tell the model's accuracy from guessing",
}


@dataclass
class Finding:
    """One conclusion. `evidence` holds the numbers it rests on; `fix` says what to change."""

    id: str
    severity: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fix: str = ""
    check: str = ""

    def __post_init__(self) -> None:
        if self.id not in FINDINGS:
            raise ValueError(f"unknown finding id {self.id!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SHOWN = 16  # items of a list or mapping written out in doctor.md; findings.json holds them all


def _more(n: int) -> str:
    return f", ... {n - SHOWN} more in findings.json" if n > SHOWN else ""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v[:SHOWN]) + _more(len(v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in list(v.items())[:SHOWN]) + _more(len(v)) + "}"
    return str(v)


def _evidence(f: Finding) -> str:
    return "; ".join(f"{k} = {_fmt(v)}" for k, v in f.evidence.items())


@dataclass
class Diagnosis:
    """The findings of one examination (or one monitored run), most severe first."""

    findings: list[Finding]
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # per check: seconds, status
    title: str = "visrec doctor"
    results: dict[str, Any] = field(default_factory=dict)  # the experiments' raw numbers
    out: Any = None  # the folder it was written to

    def __post_init__(self) -> None:
        self.findings = sorted(self.findings, key=lambda f: -f.rank)  # stable: check order within a severity

    @property
    def worst(self) -> str:
        return self.findings[0].severity if self.findings else "ok"

    def ids(self, at_least: str = "info") -> list[str]:
        low = SEVERITIES.index(at_least)
        return [f.id for f in self.findings if f.rank >= low]

    def get(self, finding_id: str) -> Finding | None:
        return next((f for f in self.findings if f.id == finding_id), None)

    def to_json(self) -> str:
        return json.dumps([f.to_dict() for f in self.findings], indent=2, default=float)

    def to_markdown(self, plots: list[str] = ()) -> str:
        lines = [f"# {self.title}", ""]
        problems = [f for f in self.findings if f.rank >= SEVERITIES.index("warn")]
        if problems:
            lines.append(f"**{len(problems)} problem(s) found.** Most severe first; fix the first one first.")
        else:
            lines.append("**No problems found** (nothing above `info`).")
        lines.append("")
        for f in self.findings:
            if f.severity == "ok":
                continue
            lines.append(f"## `{f.severity}` {f.id}")
            lines.append("")
            lines.append(f.message)
            lines.append("")
            if f.evidence:
                lines.append("Evidence: " + _evidence(f))
                lines.append("")
            if f.fix:
                lines.append(f"Fix: {f.fix}")
                lines.append("")
        passed = [f for f in self.findings if f.severity == "ok"]
        if passed:
            lines += ["## Ruled out", "", "| problem | what was seen | evidence |", "|---|---|---|"]
            for f in passed:
                ev = _evidence(f).replace("|", "/")
                lines.append(f"| {f.id} | {f.message} | {ev} |")
            lines.append("")
        if self.checks:
            lines += ["## Checks run", "", "| check | result | seconds |", "|---|---|---|"]
            for name, c in self.checks.items():
                lines.append(f"| {name} | {c.get('status', '')} | {c.get('seconds', 0):.1f} |")
            lines.append("")
        if plots:
            lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
        return "\n".join(lines)

    def print(self, console) -> None:
        from rich.markup import escape

        colors = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "red"}
        for f in self.findings:
            if f.severity == "ok":
                continue
            c = colors[f.severity]
            console.print(f"[{c}]{f.severity:5s}[/{c}] [bold]{f.id}[/bold]: {escape(f.message)}")
            if f.evidence:
                console.print("        evidence: " + escape(_evidence(f)))
            if f.fix:
                console.print(f"        fix: {escape(f.fix)}")
        n_ok = sum(f.severity == "ok" for f in self.findings)
        verdict = {"ok": "healthy", "info": "healthy (see the notes above)", "warn": "problems found",
                   "error": "serious problems found"}[self.worst]
        console.print(verdict + (f"; {n_ok} problem(s) checked for and ruled out" if n_ok else ""))
