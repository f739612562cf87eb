"""Search spaces: parameters (log-uniform, uniform, int, categorical), random and grid points, the coarse-to-fine
narrowing, and the warnings a result earns (best at an edge, within noise)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..config import Config, bounds
from ..errors import VisrecError, unknown_name

STRATEGIES = ("random", "grid", "tpe", "coarse-to-fine")
PRUNERS = ("median", "asha", "none")
KINDS = ("loguniform", "uniform", "int", "categorical")

DEFAULT_SPACE = {
    "optim.lr": {"loguniform": [0.01, 1.0]},
    "optim.weight_decay": {"loguniform": [1.0e-5, 1.0e-2]},
    "loss.label_smoothing": {"uniform": [0.0, 0.2]},
    "train.batch_size": {"categorical": [64, 128, 256]},
}
# A task whose recipe lives elsewhere declares its own space (Task.search_space: a detector's).



def task_class(name: str):
    """The task's class (its primary metric, direction and declared capabilities), registered or from a file."""
    from ..tasks import task_class as of

    return of(name)


@dataclass
class Param:
    key: str
    kind: str  # loguniform | uniform | int | categorical
    low: float = 0.0
    high: float = 0.0
    choices: list[Any] = field(default_factory=list)

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def to_spec(self) -> dict[str, Any]:
        return {self.kind: self.choices if self.kind == "categorical" else [self.low, self.high]}

    def distribution(self):
        import optuna

        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution([_hashable(c) for c in self.choices])
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high))
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return _unhashable(trial.suggest_categorical(self.key, [_hashable(c) for c in self.choices]))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "categorical":
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.kind == "int":
            return int(rng.integers(int(self.low), int(self.high) + 1))
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def grid(self, k: int) -> list[Any]:
        """k points spread over the range (geometrically for log ranges); every choice of a categorical."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return sorted({int(round(v)) for v in np.linspace(self.low, self.high, k)})
        if k == 1:
            return [float(math.sqrt(self.low * self.high)) if self.log else (self.low + self.high) / 2]
        if self.log:
            return [float(v) for v in np.geomspace(self.low, self.high, k)]
        return [float(v) for v in np.linspace(self.low, self.high, k)]

    def position(self, value: Any) -> float | None:
        """Where `value` sits in the range, 0..1 (in log space for log ranges); None for categoricals."""
        if self.kind == "categorical" or self.high == self.low:
            return None
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (float(value) - self.low) / (self.high - self.low)


def _hashable(value: Any) -> Any:
    """Optuna's categorical choices must be None, bool, int, float or str: lists travel as JSON text."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def _unhashable(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_space(doc: dict[str, Any] | str | Path | None, source: str = "search space") -> list[Param]:
    """A search space from a mapping or a YAML file; every mistake names the key and the fix."""
    if doc is None:
        doc = DEFAULT_SPACE
    elif isinstance(doc, str | Path):
        path = Path(doc)
        if not path.is_file():
            raise VisrecError(f"search space file {path} does not exist", "give a YAML file: optim.lr: {loguniform: "
                              "[1.0e-4, 1.0]}, one line per config key")
        source = str(path)
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise VisrecError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise VisrecError(f"{source}: a search space is a mapping of config keys to ranges",
                          "for example: optim.lr: {loguniform: [1.0e-4, 1.0]}")
    cfg = Config()
    params = []
    for key, spec in doc.items():
        params.append(_parse_param(str(key), spec, source))
        p = params[-1]
        probe = p.choices[0] if p.kind == "categorical" else (int(p.low) if p.kind == "int" else p.low)
        try:
            Config.from_dict(cfg.to_dict()).set(p.key, probe, source=source)
        except VisrecError as e:
            raise VisrecError(f"{source}: {e.message}", e.hint or "see visrec config --keys") from None
    return params


def _parse_param(key: str, spec: Any, source: str) -> Param:
    example = "for example: optim.lr: {loguniform: [1.0e-4, 1.0]}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise VisrecError(f"{source}: {key} must map to one distribution, got {spec!r}", example)
    kind, arg = next(iter(spec.items()))
    if kind not in KINDS:
        raise unknown_name(f"distribution of {key}", kind, KINDS, source)
    if kind == "categorical":
        if not isinstance(arg, list) or not arg:
            raise VisrecError(f"{source}: {key}: categorical needs a non-empty list of values", f"{key}: {{categorical:"
                              " [64, 128, 256]}")
        return Param(key, kind, choices=list(arg))
    if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                            for v in arg)):
        raise VisrecError(f"{source}: {key}: {kind} needs [low, high] numbers, got {arg!r}", example)
    low, high = float(arg[0]), float(arg[1])
    if low > high:
        raise VisrecError(f"{source}: {key}: the low bound {arg[0]} is above the high bound {arg[1]}",
                          f"swap them: {{{kind}: [{arg[1]}, {arg[0]}]}}")
    if low == high:
        raise VisrecError(f"{source}: {key}: the range [{arg[0]}, {arg[1]}] is empty",
                          f"widen it, or fix the value with --set {key}={arg[0]} and leave it out of the space")
    if kind == "loguniform" and low <= 0:
        raise VisrecError(f"{source}: {key}: a loguniform range needs positive bounds, got [{arg[0]}, {arg[1]}]",
                          f"use uniform for ranges that include 0, or start at a small positive value (e.g. "
                          f"{high / 1000:g})")
    if kind == "int" and not (float(arg[0]).is_integer() and float(arg[1]).is_integer()):
        raise VisrecError(f"{source}: {key}: int needs integer bounds, got {arg!r}")
    return Param(key, kind, low, high)


def random_params(params: list[Param], n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{p.key: p.sample(rng) for p in params} for _ in range(n)]


def grid_params(params: list[Param], n: int, seed: int) -> list[dict[str, Any]]:
    """n points of the coarsest full grid with at least n points (k per numeric axis), in a seeded order."""
    cats = math.prod(len(p.choices) for p in params if p.kind == "categorical")
    numeric = [p for p in params if p.kind != "categorical"]
    k = 1
    while numeric and cats * math.prod(len(p.grid(k)) for p in numeric) < n and k < 1000:
        k += 1
    axes = [p.grid(k) for p in params]
    points = [dict(zip([p.key for p in params], combo, strict=True)) for combo in _product(axes)]
    order = np.random.default_rng(seed).permutation(len(points))
    return [points[i] for i in order[:n]]


def _product(axes: list[list[Any]]) -> list[tuple]:
    out: list[tuple] = [()]
    for axis in axes:
        out = [t + (v,) for t in out for v in axis]
    return out


def narrow(params: list[Param], results: list[tuple[dict[str, Any], float]], top: float = 0.25,
           min_top: int = 3) -> list[Param]:
    """The coarse-to-fine step: each range shrunk to the span of the best trials' values (the top `top` fraction,
    at least `min_top`), widened by a quarter of that span on each side (in log space for log ranges) and kept inside
    the original range; categoricals keep the values the best trials used."""
    ranked = sorted((r for r in results if r[1] is not None and math.isfinite(r[1])), key=lambda r: -r[1])
    best = ranked[: max(min_top, math.ceil(top * len(ranked)))]
    if not best:
        return params
    out = []
    for p in params:
        values = [b[0][p.key] for b in best if p.key in b[0]]
        if not values:
            out.append(p)
            continue
        if p.kind == "categorical":
            keep = [c for c in p.choices if any(_same(c, v) for v in values)]
            out.append(Param(p.key, p.kind, choices=keep or p.choices))
            continue
        f = math.log if p.log else float
        inv = math.exp if p.log else float
        lo, hi = min(f(v) for v in values), max(f(v) for v in values)
        pad = max((hi - lo) / 4, (f(p.high) - f(p.low)) * 0.05)
        low, high = max(inv(lo - pad), p.low), min(inv(hi + pad), p.high)
        if p.kind == "int":
            low, high = math.floor(low), math.ceil(high)
            if low == high:
                low, high = max(p.low, low - 1), min(p.high, high + 1)
        out.append(Param(p.key, p.kind, float(low), float(high)))
    return out


def _same(a: Any, b: Any) -> bool:
    return _hashable(a) == _hashable(b)


def edge_warnings(params: list[Param], best: dict[str, Any], margin: float = 0.1) -> list[str]:
    """The course's warning: a best value near the edge of its range means the optimum may lie outside."""
    out = []
    for p in params:
        if p.key not in best:
            continue
        pos = p.position(best[p.key])
        if pos is None:
            continue
        if pos <= margin or pos >= 1 - margin:
            side = "bottom" if pos <= margin else "top"
            try:
                lo, hi = bounds(p.key)
            except (KeyError, ValueError, AttributeError):
                lo = hi = None
            if (side == "bottom" and lo is not None and p.low <= lo) or (side == "top" and hi is not None
                                                                        and p.high >= hi):
                continue  # the range already reaches the key's natural limit (smoothing cannot go below 0)
            out.append(f"{p.key} = {best[p.key]:.4g} is at the {side} of its range [{p.low:g}, {p.high:g}]: the best "
                       f"value may lie beyond it; widen the range {'down' if side == 'bottom' else 'up'} and search "
                       "again")
    return out


def noise_warning(best: dict[str, Any], runner_up: dict[str, Any] | None, n_val: int) -> str | None:
    """Whether the best trial's lead over the runner-up is within the sampling noise of `n_val` validation images
    (two standard errors of the difference of two accuracies measured on them); the warning says what to do."""
    if runner_up is None or n_val <= 0:
        return None
    a, b = best["value"], runner_up["value"]
    p = (a + b) / 2
    noise = 2 * math.sqrt(max(2 * p * (1 - p), 1e-12) / n_val)
    if a - b >= noise:
        return None
    return (f"the best trial (#{best['number']}, {a:.2%}) leads the runner-up (#{runner_up['number']}, {b:.2%}) by "
            f"{a - b:.2%}, within the noise of {n_val} validation images (a lead under {noise:.1%} can be chance): "
            "retrain the two (or the top few) with other seeds, or give more validation images "
            "(data.val_fraction), before trusting the choice")
