"""The pre-flight examination: the course's babysitting playbook, run as experiments on the real config.

    diagnosis = visrec.doctor.examine("fashion-mnist")           # the config `visrec train` would use
    diagnosis = visrec.doctor.examine("synthetic", model="my.py:net", overrides={"optim.lr": 1.0})

Checks run in order, each registered by name in `CHECKS` (one function each): `data`, `model`,
`initial-loss`, `regularization`, `gradient-check`, `overfit`, `lr-range`, `trial`. A check returns
findings and may stop the examination (a model that returns the wrong shape cannot be trained at all).
Afterwards `reconcile` joins the evidence: a failure to overfit explained by a learning-rate finding is
reported as a consequence, chance-level validation with working optimization becomes
`labels-not-learnable`, and so on. A finding with severity `ok` means that problem was checked for and
not found.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, LossConfig
from ..data import Dataset, stratified_split, stratified_subset
from ..device import resolve_device, seed_everything, set_threads
from ..errors import VisrecError
from ..evaluate import evaluate
from ..io import write_text, write_yaml
from ..models._registry import BadModelOutput
from ..runs import dataset_from_config, setup_config
from ..training.losses import build_loss
from ..training.optim import build_optimizer, param_groups
from ..training.setup import build_model, epoch_batch_size, fit_normalizer
from .findings import SEVERITIES, Diagnosis, Finding
from .gradcheck import gradient_check
from .lr_finder import default_range, lr_range_test
from .monitor import TrainingMonitor, gap_findings, layer_findings, watch_activations, watched_layers


@dataclass
class ExamOptions:
    """How much work each experiment does. The defaults take about a minute for the default recipe on a CPU."""

    overfit_examples: int = 32
    overfit_steps: int = 200
    lr_steps: int = 100
    lr_batch: int = 256  # at most this batch size in the LR sweep (the configured one if smaller)
    trial_images: int = 5000  # training images of the trial run
    trial_val: int = 1000  # validation images it is scored on
    trial_epochs: int = 3
    trial_min_steps: int = 60  # more epochs for small datasets, up to 60 steps
    seed: int = 0
    checks: tuple[str, ...] | None = None  # a subset of CHECKS to run; None = all


@dataclass
class Exam:
    """What the checks share: the config, the data, and what earlier checks found."""

    cfg: Config
    ds: Dataset
    out: Path
    opts: ExamOptions
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    findings: list[Finding] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    abort: bool = False

    def __post_init__(self) -> None:
        self.normalizer = fit_normalizer(self.cfg, self.ds).to(self.device)
        self.loss_fn = build_loss(self.cfg.loss)
        # "Regularization off": no label smoothing (weight decay lives in the optimizer, not the loss).
        self.plain_loss = build_loss(LossConfig(name=self.cfg.loss.name, label_smoothing=0.0,
                                                margin=self.cfg.loss.margin))
        self.C = self.ds.num_classes
        ce = self.cfg.loss.name == "cross_entropy"
        self.chance_loss = math.log(self.C) if ce else (self.C - 1) * self.cfg.loss.margin

    def new_model(self, seed: int | None = None) -> nn.Module:
        """A freshly initialized network, built as training builds it (a whitening first layer is fitted to the
        data), without the initial weights of model.weights: the doctor examines training from scratch."""
        seed = self.opts.seed if seed is None else seed
        seed_everything(seed)
        m, _, _ = build_model(self.cfg, self.ds, self.normalizer, self.C, seed=seed, load_weights_from_config=False)
        return m.to(self.device)

    def sample(self, n: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.ds.split(split)
        idx = stratified_subset(s.labels, n, seed)
        return self.normalizer(s.images[idx].to(self.device)), s.labels[idx].to(self.device)

    def add(self, check: str, *findings: Finding) -> None:
        for f in findings:
            f.check = f.check or check
            self.findings.append(f)

    def has(self, finding_id: str, at_least: str = "warn") -> bool:
        low = SEVERITIES.index(at_least)
        return any(f.id == finding_id and f.rank >= low for f in self.findings)


# ---------------------------------------------------------------------- data


def _row_hashes(images: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash per image (a random linear form over the pixels, wrapping around); equal images agree."""
    flat = images.reshape(images.shape[0], -1).long()
    w = torch.randint(-(2**62), 2**62, (flat.shape[1],), generator=torch.Generator().manual_seed(12345))
    return torch.cat([(chunk * w).sum(1) for chunk in flat.split(4096)]) if len(flat) else torch.zeros(0).long()


def overlap(train: torch.Tensor, test: torch.Tensor) -> list[int]:
    """Indices of test images that also occur, byte for byte, among the training images."""
    ht, hs = _row_hashes(train.cpu()), _row_hashes(test.cpu())
    cand = torch.nonzero(torch.isin(hs, ht)).flatten().tolist()
    if not cand:
        return []
    by_hash: dict[int, list[int]] = {}
    for i, h in enumerate(ht.tolist()):
        by_hash.setdefault(h, []).append(i)
    tr, te = train.cpu(), test.cpu()
    return [j for j in cand if any(torch.equal(te[j], tr[i]) for i in by_hash.get(int(hs[j]), []))]


STREAMED_SAMPLE = 2000  # images in their files: the constant-image check decodes a sample of each split


def same_files(train: list[Path], test: list[Path]) -> list[int]:
    """Indices of test files whose bytes equal a training file's: sizes first (one stat each), then a digest of the
    files whose size another shares."""
    import hashlib

    def size(p) -> int:
        if not isinstance(p, Path):  # a sample inside a shard
            return p.size
        try:
            return p.stat().st_size
        except OSError:
            return -1

    train_sizes: dict[int, list[Path]] = {}
    for p in train:
        train_sizes.setdefault(size(p), []).append(p)

    def digest(p) -> str:
        try:
            return hashlib.sha1(p.read_bytes() if isinstance(p, Path) else p.read()).hexdigest()
        except (OSError, VisrecError):
            return f"unreadable:{p}"

    found, known = [], {}
    for j, p in enumerate(test):
        peers = train_sizes.get(size(p), [])
        if not peers or size(p) < 0:
            continue
        for q in peers:
            if q not in known:
                known[q] = digest(q)
        if digest(p) in {known[q] for q in peers}:
            found.append(j)
    return found


def check_data(ex: Exam) -> None:
    ds, C = ex.ds, ex.C
    counts = ds.train.class_counts()
    present = [c for c in counts if c > 0]
    if len(present) < 2:
        ex.add("data", Finding(
            "single-class", "error",
            f"the training split of {ds.name!r} has {len(present)} class(es) with examples: a classifier needs two "
            f"or more", {"classes": ds.classes, "train_counts": counts},
            "point the dataset at a folder with one subfolder per class, at least two of them",
        ))
        ex.abort = True
        return
    empty = [ds.classes[i] for i, c in enumerate(counts) if c == 0]
    ratio = max(present) / min(present)
    ev = {"train_counts": dict(zip(ds.classes, counts, strict=True)) if C <= 20 else counts,
          "max_over_min": round(ratio, 2)}
    if empty or ratio >= 10:
        ex.add("data", Finding(
            "class-imbalance", "warn",
            (f"classes without training examples: {', '.join(empty)}; " if empty else "")
            + f"the largest class has {ratio:.1f}x the examples of the smallest: accuracy will favour the big ones",
            ev, "collect more of the small classes, or train with class-balanced sampling / loss weights; judge "
            "the model by per-class accuracy (per_class.csv), not only overall accuracy",
        ))
    elif ratio >= 3:
        ex.add("data", Finding("class-imbalance", "info", f"classes are moderately imbalanced ({ratio:.1f}x)", ev,
                               "look at per-class accuracy (per_class.csv) as well as the overall number"))
    else:
        ex.add("data", Finding("class-imbalance", "ok", f"classes are balanced ({ratio:.2f}x)", ev))
    if min(present) < 20:
        ex.add("data", Finding(
            "small-train-set", "info", f"only {min(present)} training images in the smallest class",
            {"min_per_class": min(present), "n_train": len(ds.train)},
            "expect overfitting: use augmentation and weight decay, or start from a pretrained model",
        ))
    # Input statistics after preprocessing, as the model will see them.
    x, _ = ex.sample(2048)
    mean, std = x.mean().item(), x.std().item()
    lo, hi = x.min().item(), x.max().item()
    ev = {"mean": round(mean, 4), "std": round(std, 4), "min": round(lo, 3), "max": round(hi, 3),
          "normalize": ex.cfg.data.normalize}
    if max(abs(lo), abs(hi)) > 20 or std > 10:
        ex.add("data", Finding(
            "input-not-normalized", "error",
            f"the model gets inputs with mean {mean:.3g} and std {std:.3g} (range {lo:.3g}..{hi:.3g}): raw pixel "
            f"values, hundreds of times the scale the initialization and learning rate assume",
            ev, "normalize: --set data.normalize=channel (subtract the training mean, divide by the std)",
        ))
    elif abs(mean) > 1 or std > 3 or std < 0.3:
        ex.add("data", Finding("input-not-normalized", "warn",
                               f"inputs have mean {mean:.3g} and std {std:.3g}, not about 0 and 1", ev,
                               "--set data.normalize=channel"))
    else:
        ex.add("data", Finding("input-not-normalized", "ok", f"inputs have mean {mean:.2f} and std {std:.2f}", ev))
    # Constant images (images in their files: a seeded sample of each split).
    flat_counts, sampled = {}, {}
    for name in ("train", "test"):
        part = ds.split(name).images
        if not isinstance(part, torch.Tensor):
            part = part.sample(STREAMED_SAMPLE, seed=ex.opts.seed)
            sampled[name] = len(part)
        imgs = part.reshape(len(part), -1)
        flat_counts[name] = int(sum((c.amax(1) == c.amin(1)).sum().item() for c in imgs.split(8192)))
    n_const = sum(flat_counts.values())
    total = len(ds.train) + len(ds.test)
    if n_const:
        ex.add("data", Finding(
            "constant-images", "warn" if n_const / total >= 0.01 else "info",
            f"{n_const} image(s) are one flat value (blank or corrupt)",
            {"count_by_split": flat_counts, **({"sampled": sampled} if sampled else {})},
            "inspect and remove them, or check how the files are decoded",
        ))
    # Test images that also sit in the training split: byte for byte, as decoded or (streamed) as files.
    if ds.streamed:
        held = [*ds.train.images.paths, *(ds.val.images.paths if ds.val is not None else [])]
        dup = same_files(held, ds.test.images.paths)
    else:
        dup = overlap(torch.cat([ds.train.images] + ([ds.val.images] if ds.val is not None else [])),
                      ds.test.images)
    frac = len(dup) / max(len(ds.test), 1)
    ev = {"test_images_in_train": len(dup), "fraction_of_test": round(frac, 4), "examples": dup[:10]}
    if frac >= 0.01:
        ex.add("data", Finding(
            "train-test-overlap", "error",
            f"{len(dup)} test images ({frac:.1%}) also appear in the training data: the test accuracy will be "
            f"inflated by memorization", ev,
            "remove the duplicates from the training split (or from test) before trusting any test number",
        ))
    elif dup:
        ex.add("data", Finding("train-test-overlap", "info",
                               f"{len(dup)} test image(s) ({frac:.2%}) also appear in the training data", ev,
                               "negligible for the accuracy, but worth removing"))
    else:
        ex.add("data", Finding("train-test-overlap", "ok", "no test image appears in the training data", ev))


# ---------------------------------------------------------------------- model at initialization


def _forward_with_stats(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    acts: dict[str, Any] = {}
    handles = watch_activations(watched_layers(model), acts)
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, acts


def check_model(ex: Exam) -> None:
    try:
        model = ex.new_model()
    except BadModelOutput as e:
        ex.add("model", Finding("bad-output", "error", e.message, {"model": ex.cfg.model.name}, e.hint or
                                f"make the model return (batch, {ex.C}) raw scores"))
        ex.abort = True
        return
    model.train()
    x, y = ex.sample(min(128, len(ex.ds.train)), seed=1)
    out, acts = _forward_with_stats(model, x)
    if out.dim() != 2 or out.shape[1] != ex.C:
        ex.add("model", Finding("bad-output", "error", f"the model returned shape {tuple(out.shape)} for a batch "
                                f"of {len(x)}; it must return ({len(x)}, {ex.C}), one score per class",
                                {"shape": list(out.shape)}, "end the network with a layer of num_classes outputs"))
        ex.abort = True
        return
    ex.add("model", Finding("bad-output", "ok", f"the model returns one score per class ({ex.C})"))
    o = out.detach().float()
    if bool((o >= 0).all()) and float((o.sum(1) - 1).abs().max()) < 1e-3:
        ex.add("model", Finding(
            "output-is-probabilities", "error",
            "the model's outputs are non-negative and sum to 1 for every example: it applies softmax itself, and "
            "the loss applies it again, so the loss cannot go below ~ln(1 + (C-1)/e) and gradients shrink",
            {"row_sums_min": round(o.sum(1).min().item(), 5), "row_sums_max": round(o.sum(1).max().item(), 5)},
            "remove the final softmax; return raw scores (logits). Apply softmax only when you want probabilities",
        ))
    elif bool((o >= 0).all()) and bool((o <= 1).all()) and ex.C > 2 and float(o.max() - o.min()) > 1e-6:
        ex.add("model", Finding(
            "output-is-probabilities", "warn", "every output lies in [0, 1]: the model seems to end with a sigmoid",
            {"min": o.min().item(), "max": o.max().item()}, "remove the final sigmoid; return raw scores"))
    else:
        ex.add("model", Finding("output-is-probabilities", "ok", "the model returns raw scores (logits)"))
    sym = {n: round(p.detach().flatten()[0].item(), 6) for n, p in model.named_parameters()
           if p.dim() >= 2 and p.numel() > 1 and bool((p == p.detach().flatten()[0]).all())}
    if sym:
        ex.add("model", Finding(
            "symmetric-init", "error",
            f"{len(sym)} weight tensor(s) start with all entries equal ({', '.join(list(sym)[:4])}): every unit of "
            f"such a layer computes the same thing and gets the same gradient, so they stay identical forever",
            {"constant_weights": sym},
            "initialize weights randomly (PyTorch's default, or nn.init.kaiming_normal_ for ReLU networks); only "
            "biases may start at zero",
        ))
    else:
        ex.add("model", Finding("symmetric-init", "ok", "weights start random (no layer is constant)"))
    loss = ex.plain_loss(out, y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: {"grad_norm": p.grad.float().norm().item() if p.grad is not None else 0.0,
                 "weight_norm": p.detach().float().norm().item()}
             for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2}
    for f in layer_findings([{"step": 0, "acts": acts, "layers": grads}]):
        f.message = "at initialization, " + f.message
        ex.add("model", f)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
            and p.dim() >= 2 and not bool(p.grad.any())]
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    if unused:
        ex.add("model", Finding(
            "no-gradient", "error",
            f"{len(unused)} parameter(s) get no gradient at all ({', '.join(unused[:4])}): they are not connected to "
            f"the output (a .detach(), torch.no_grad(), .data, or a layer built but never used)",
            {"no_grad": unused[:20], "frozen_params": frozen},
            "find where the graph is cut in forward(); tensors that must learn must flow to the output",
        ))
    elif zero and not any(ex.has(i) for i in ("symmetric-init", "dead-units")):
        ex.add("model", Finding(
            "no-gradient", "warn", f"{len(zero)} weight tensor(s) get an all-zero gradient ({', '.join(zero[:4])})",
            {"zero_grad": zero[:20]}, "check the initialization and the activations feeding those layers",
        ))
    else:
        ex.add("model", Finding("no-gradient", "ok", "every parameter receives a gradient",
                                {"frozen_params": frozen}))
    if not ex.has("dead-units", "info"):
        ex.add("model", Finding("dead-units", "ok", "no dead units at initialization"))


def check_initial_loss(ex: Exam) -> None:
    model = ex.new_model()
    model.train()
    x, y = ex.sample(min(512, len(ex.ds.train)), seed=2)
    with torch.no_grad():
        loss = ex.plain_loss(model(x), y).item()
    exp = ex.chance_loss
    ratio = loss / exp if exp > 0 else float("inf")
    ev = {"observed": round(loss, 4), "expected": round(exp, 4), "ratio": round(ratio, 3),
          "loss": ex.cfg.loss.name, "classes": ex.C}
    ex.results["initial_loss"] = loss
    what = "ln C" if ex.cfg.loss.name == "cross_entropy" else "(C - 1) x margin"
    if not math.isfinite(loss) or ratio > 4:
        sev = "error"
    elif ratio > 1.5 or ratio < 0.7:
        sev = "warn"
    else:
        ex.add("initial-loss", Finding("initial-loss-off", "ok",
                                       f"the initial loss {loss:.3f} is near chance ({what} = {exp:.3f})", ev))
        return
    high = not math.isfinite(loss) or ratio > 1
    ex.add("initial-loss", Finding(
        "initial-loss-off", sev,
        f"the initial loss is {loss:.4g}, but a network that knows nothing should score {what} = {exp:.3f} "
        + ("(the scores at initialization are far too large)" if high else
           "(lower than chance before training: labels leak into the input, or the loss is computed wrongly)"),
        ev, "scale the initialization down (e.g. init the last layer with small weights), normalize the input"
        if high else "check that the loss uses the right labels and that the input does not encode the label",
    ))


def check_regularization(ex: Exam) -> None:
    wd = ex.cfg.optim.weight_decay
    model = ex.new_model()
    x, y = ex.sample(min(256, len(ex.ds.train)), seed=3)
    with torch.no_grad():
        data_loss = ex.plain_loss(model(x), y).item()
    groups = param_groups(model, wd, ex.cfg.optim.decay_all)
    decayed = groups[0]["params"]
    penalty = 0.5 * wd * sum(float((p.detach().float() ** 2).sum()) for p in decayed)
    ev = {"weight_decay": wd, "data_loss": round(data_loss, 4), "l2_penalty": round(penalty, 5),
          "decayed_tensors": len(decayed)}
    if wd == 0:
        ex.add("regularization", Finding("regularization-no-effect", "ok",
                                         "no weight decay is configured (optim.weight_decay=0)", ev))
        return
    if not decayed:
        ex.add("regularization", Finding(
            "regularization-no-effect", "warn",
            f"optim.weight_decay={wd} is set, but no parameter is in the decayed group", ev,
            "weights with 2+ dims decay by default; check the model's no_weight_decay() or set optim.decay_all=true"))
        return
    # One optimizer step with zero data gradient: only the regularization acts, and must shrink the weights.
    # The step uses lr 0.1 so that the shrink shows in float32 whatever the configured rate.
    wiring = copy.deepcopy(ex.cfg.optim)
    wiring.lr = 0.1
    opt = build_optimizer(model, wiring)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in decayed))
    opt.step()
    after = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in decayed))
    ev["weight_norm_shrink_per_step_at_lr_0.1"] = (before - after) / before if before > 0 else 0.0
    if before > 0 and not after < before:
        ex.add("regularization", Finding(
            "regularization-no-effect", "warn",
            f"weight_decay={wd} did not shrink the weights in a step with zero data gradient", ev,
            "check that the optimizer receives the weight decay (optim.name and its param groups)"))
    else:
        ex.add("regularization", Finding(
            "regularization-no-effect", "ok",
            f"regularization raises the loss from {data_loss:.4f} to {data_loss + penalty:.4f} and shrinks the "
            f"weights by {ev['weight_norm_shrink_per_step_at_lr_0.1']:.2e} per step at lr 0.1", ev))


def check_gradients(ex: Exam) -> None:
    model = ex.new_model()
    x, _ = ex.sample(min(4, len(ex.ds.train)), seed=4)
    try:
        results = gradient_check(model, x)
    except Exception as e:  # noqa: BLE001 - a custom layer that cannot run in float64 is reported, not fatal
        ex.add("gradient-check", Finding("gradient-check-failed", "info",
                                         f"the gradient check could not run: {type(e).__name__}: {e}"))
        return
    if not results:
        ex.add("gradient-check", Finding("gradient-check-failed", "ok",
                                         "no hand-written backward (custom autograd Function or backward hook): "
                                         "autograd differentiates every layer, so no gradient can disagree"))
        return
    for r in results:
        ev = {"module": r.module, "backward": r.backward, "max_rel_error": float(f"{r.max_rel_error:.3g}"),
              "coordinates": r.checked, "worst": r.worst, "precision": r.precision}
        warn, error = r.tolerance
        at = "" if r.precision == "float64" else f" (checked in {r.precision}, the precision the layer computes in)"
        if r.max_rel_error > warn:
            ex.add("gradient-check", Finding(
                "gradient-check-failed", "error" if r.max_rel_error > error else "warn",
                f"the hand-written backward of {r.module!r} ({r.backward}) disagrees with finite differences "
                f"(relative error {r.max_rel_error:.2g}; a correct one stays below {warn:g}){at}", ev,
                "fix the backward (or drop it and let autograd differentiate the forward)",
            ))
        else:
            ex.add("gradient-check", Finding("gradient-check-failed", "ok",
                                             f"the hand-written backward of {r.module!r} ({r.backward}) matches "
                                             f"finite differences (relative error {r.max_rel_error:.1e}){at}", ev))


# ---------------------------------------------------------------------- optimization


def _overfit_run(ex: Exam, x, y, make_opt: Callable[[nn.Module], torch.optim.Optimizer], steps: int
                 ) -> dict[str, Any]:
    model = ex.new_model()
    opt = make_opt(model)
    thr = 0.05 * ex.chance_loss
    losses, accs, ratios = [], [], []
    res: dict[str, Any] = {"success": False, "steps": steps}
    weights = [p for p in model.parameters() if p.dim() >= 2]
    for i in range(steps):
        model.train()
        out = model(x)
        loss = ex.plain_loss(out, y)
        if not torch.isfinite(loss):
            res.update(nonfinite=True, steps=i + 1)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for p in weights] if i < 3 else None
        opt.step()
        if before is not None and (r := _update_ratio(weights, before)) is not None:
            ratios.append(r)  # the course's check on the first steps: how far one update moves the weights
        losses.append(loss.item())
        accs.append((out.detach().argmax(1) == y).float().mean().item())
        if (i + 1) % 10 == 0 or i == steps - 1:
            model.eval()
            with torch.no_grad():
                o = model(x)
                el, ea = ex.plain_loss(o, y).item(), (o.argmax(1) == y).float().mean().item()
            res.update(eval_loss=el, eval_acc=ea)
            if ea == 1.0 and el < thr:
                res.update(success=True, steps=i + 1)
                break
    res["first_update_ratio"] = max(ratios) if ratios else None
    res.update(losses=losses, accs=accs, first_loss=losses[0] if losses else float("nan"),
               final_loss=losses[-1] if losses else float("nan"), final_acc=accs[-1] if accs else 0.0)
    return res


def check_overfit(ex: Exam) -> None:
    o = ex.opts
    n = min(o.overfit_examples, len(ex.ds.train))
    x, y = ex.sample(n, seed=5)
    cfg_opt = copy.deepcopy(ex.cfg.optim)
    cfg_opt.weight_decay = 0.0
    first = _overfit_run(ex, x, y, lambda m: build_optimizer(m, cfg_opt), o.overfit_steps)
    ex.results["overfit"] = first
    from .plots import plot_overfit

    if first["losses"]:
        ex.plots.append(plot_overfit(first["losses"], first["accs"], ex.out / "plots" / "overfit.png"))
    ev = {"examples": n, "optimizer": cfg_opt.name, "lr": cfg_opt.lr, "steps": first["steps"],
          "final_loss": round(first["final_loss"], 4) if math.isfinite(first["final_loss"]) else "non-finite",
          "final_acc": round(first.get("eval_acc", first["final_acc"]), 4)}
    if "eval_loss" in first:
        ev["eval_loss"] = round(first["eval_loss"], 4)  # the loss in eval mode, which the messages quote
    if first["success"]:
        ex.add("overfit", Finding("cannot-overfit", "ok",
                                  f"overfits {n} examples (100% accuracy, eval-mode loss {first['eval_loss']:.3g}) "
                                  f"in {first['steps']} steps with the configured optimizer", ev))
        return
    ref = _overfit_run(ex, x, y, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), int(o.overfit_steps * 1.5))
    ex.results["overfit_reference"] = ref
    ev.update(reference="adam lr=0.001", reference_success=ref["success"], reference_steps=ref["steps"],
              reference_final_loss=round(ref["final_loss"], 4) if math.isfinite(ref["final_loss"]) else "non-finite",
              reference_acc=round(ref.get("eval_acc", ref["final_acc"]), 4))
    if ref["success"]:
        ex.add("overfit", Finding(
            "cannot-overfit", "warn",
            f"with the configured optimizer ({cfg_opt.name}, lr {cfg_opt.lr:g}) the model cannot fit {n} examples in "
            f"{o.overfit_steps} steps, but Adam at lr 1e-3 fits them in {ref['steps']}: the model is fine, the "
            f"optimizer settings (most likely the learning rate) are not", ev,
            "see the learning-rate findings; try the suggested --lr",
        ))
    else:
        ex.add("overfit", Finding(
            "cannot-overfit", "error",
            f"the model cannot fit {n} examples: after {first['steps']} steps the loss is still {ev['final_loss']} "
            f"and accuracy {ev['final_acc']:.0%} (Adam at lr 1e-3 does no better). A working network memorizes a "
            f"few dozen examples easily", ev,
            "look for a loss/output mismatch (softmax before the loss), blocked gradients, a wrong custom backward, "
            "or a model too small for the task",
        ))


def _update_ratio(weights: list[torch.Tensor], before: list[torch.Tensor]) -> float | None:
    """The median over the weight tensors of |one update| / |weights before it|; None when all were zero."""
    rs = sorted(((p.detach() - b).norm() / b.norm()).item() for p, b in zip(weights, before, strict=True)
                if b.norm() > 0)
    return rs[len(rs) // 2] if rs else None


def _ratio_at_lr(ex: Exam, batch, steps: int = 8) -> float | None:
    """The course's cross-check: the median update/weight ratio of the last steps of a short run at the
    configured learning rate (constant), on real batches (momentum buffers filled)."""
    model = ex.new_model()
    opt = build_optimizer(model, ex.cfg.optim)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    ratios = []
    model.train()
    for i in range(steps):
        x, y = batch(1000 + i)
        loss = ex.loss_fn(model(x), y)
        if not torch.isfinite(loss):
            return float("inf")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for p in weights]
        opt.step()
        r = _update_ratio(weights, before)
        if r is not None and i >= steps - 3:
            ratios.append(r)
    return sum(ratios) / len(ratios) if ratios else None


def _trains_stably(ex: Exam, batch, lr: float, steps: int = 100) -> bool:
    """A short run at a constant `lr`: does the loss fall and stay down? (A rate can first fall fast, then blow
    up once the loss is small: the sweep's minimum/10 rule misses that.)"""
    cfg = copy.deepcopy(ex.cfg.optim)
    cfg.lr = lr
    model = ex.new_model()
    opt = build_optimizer(model, cfg)
    model.train()
    losses = []
    for i in range(steps):
        x, y = batch(3000 + i)
        loss = ex.loss_fn(model(x), y)
        if not torch.isfinite(loss):
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    k = max(1, steps // 10)
    start, end = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return end < start and max(losses[steps // 2:]) <= max(losses[:k])


def _safe_rate(ex: Exam, batch, lr: float, tries: int = 3) -> tuple[float, list[float]]:
    """The suggested rate, lowered 10x at a time until a short constant-rate run is stable at it."""
    refused = []
    for _ in range(tries):
        if _trains_stably(ex, batch, lr):
            break
        refused.append(lr)
        lr /= 10
    return lr, refused


def check_lr_range(ex: Exam) -> None:
    o, c = ex.opts, ex.cfg.optim
    model = ex.new_model()
    opt = build_optimizer(model, c)
    t = ex.cfg.train  # the batch training would use (small sets get smaller ones), at most lr_batch
    bs = min(epoch_batch_size(t.batch_size, len(ex.ds.train), t.min_epoch_steps), o.lr_batch)
    train = ex.ds.train
    g = torch.Generator().manual_seed(o.seed + 6)

    def batch(i: int):
        idx = torch.randint(0, len(train), (bs,), generator=g)
        return ex.normalizer(train.images[idx].to(ex.device)), train.labels[idx].to(ex.device)

    lo, hi = default_range(c.name, c.lr)
    res = lr_range_test(model, opt, batch, ex.loss_fn, lr_min=lo, lr_max=hi, steps=o.lr_steps)
    ex.results["lr_range"] = res
    from .plots import plot_lr_finder

    ex.plots.append(plot_lr_finder(res.lrs, res.smoothed, res.suggested, c.lr, ex.out / "plots" / "lr_finder.png"))
    p = c.lr
    ratio = _ratio_at_lr(ex, batch)
    ex.results["update_ratio"] = ratio
    ev = {"configured_lr": p, **res.to_dict()}
    if ratio is not None:
        ev["update_weight_ratio_at_lr"] = float(f"{ratio:.3g}") if math.isfinite(ratio) else "non-finite"
    fix_to = f"--lr {res.suggested:.2g}" if res.suggested else "--lr 10x lower"
    too_high = res.conclusive and (c.lr > 10 * res.lr_at_min or bool(res.lr_diverged and c.lr > res.lr_diverged / 2))
    if res.suggested and too_high:
        safe, refused = _safe_rate(ex, batch, res.suggested)  # only when a lower rate will be advised
        if refused:
            ev["suggested_unstable"] = [float(f"{r:.3g}") for r in refused]
        ev["suggested_checked"] = float(f"{safe:.3g}")
        fix_to = f"--lr {safe:.2g}"
    if not res.conclusive:
        if ratio is not None and ratio > 0.5:
            _sweep_verdict(ex, Finding("lr-too-high", "warn",
                                       f"at lr {p:g} one step changes the weights by {ratio:.0%} of their norm "
                                       f"(rule of thumb: 0.1%)", ev, "lower the learning rate 10x"))
        elif ratio is not None and 0 < ratio < 1e-6:
            _sweep_verdict(ex, Finding("lr-too-low", "warn",
                                       f"at lr {p:g} one step changes the weights by only {ratio:.1e} of their norm "
                                       f"(rule of thumb: 1e-3)", ev, "raise the learning rate 10x at a time"))
        else:
            ex.add("lr-range", Finding("lr-range-inconclusive", "info",
                                       f"the range test is inconclusive: the loss fell only {res.drop:.0%} at any "
                                       f"rate between {lo:.0e} and {hi:.0e}", ev,
                                       "if the labels are right, the model may need a different architecture"))
        return
    if res.lr_diverged is not None and p >= res.lr_diverged:
        _sweep_verdict(ex, Finding(
            "lr-too-high", "error",
            f"the learning rate {p:g} is past the point where the loss blows up ({res.lr_diverged:.2g}); the loss is "
            f"lowest near {res.lr_at_min:.2g}", ev, f"lower it: {fix_to}"))
    elif (res.lr_diverged is not None and p > res.lr_diverged / 2) or p > 10 * res.lr_at_min:
        _sweep_verdict(ex, Finding(
            "lr-too-high", "warn",
            f"the learning rate {p:g} is above the range where the loss falls (lowest loss near "
            f"{res.lr_at_min:.2g}, blow-up near {res.lr_diverged or float('nan'):.2g})", ev, f"lower it: {fix_to}"))
    elif p < res.lr_at_min / 1000:
        _sweep_verdict(ex, Finding(
            "lr-too-low", "error",
            f"the learning rate {p:g} is {res.lr_at_min / p:.0f}x below the rate where the loss falls fastest "
            f"({res.lr_at_min:.2g}): training will crawl", ev, f"raise it: {fix_to}"))
    elif p < res.lr_at_min / 100:
        _sweep_verdict(ex, Finding(
            "lr-too-low", "warn",
            f"the learning rate {p:g} is {res.lr_at_min / p:.0f}x below the best range (lowest loss near "
            f"{res.lr_at_min:.2g})", ev, f"raise it: {fix_to}"))
    else:
        ex.add("lr-range", Finding(
            "lr-too-high", "ok",
            f"the learning rate {p:g} is inside the useful range: the loss falls fastest up to about "
            f"{res.lr_at_min:.2g}" + (f" and blows up near {res.lr_diverged:.2g}" if res.lr_diverged else "")
            + f" (for a constant rate, about {res.suggested:.2g} is the safe choice)", ev))


def _sweep_verdict(ex: Exam, f: Finding) -> None:
    """A rate the sweep calls too high or too low is only a suspicion: the sweep ramps a fresh model through
    every rate in a few dozen steps, while the run warms up, decays and normalizes. It is reported as info and
    the trial run, on the config's own schedule, decides in `reconcile`."""
    f.evidence["sweep_severity"] = f.severity
    f.evidence["schedule"] = _schedule_phases(ex)
    f.severity = "info"
    ex.results["lr_sweep"] = f
    ex.add("lr-range", f)


def _schedule_phases(ex: Exam) -> str:
    """The rates the run actually uses, in words."""
    s, lr = ex.cfg.schedule, ex.cfg.optim.lr
    if s.name == "one_cycle":
        return (f"one_cycle: from {lr * s.start_factor:.2g} up to the peak {lr:g} over the first {s.pct_start:.0%} "
                f"of the steps, then down to {lr * s.end_factor:.2g}")
    warm = f"a warmup from {lr * s.start_factor:.2g} over {s.warmup_epochs:g} epoch(s), then " \
        if s.warmup_epochs else ""
    return f"{warm}{s.name} from {lr:g}"


def _judge_sweep(ex: Exam) -> None:
    """Confirm or clear the sweep's rate suspicion with the trial run's own evidence."""
    f = ex.results.get("lr_sweep")
    if f is None:
        return
    trial_ids = {g.id for g in ex.findings if g.check == "trial" and g.severity in ("warn", "error")}
    signs = ({"loss-diverging", "loss-noisy", "non-finite-loss", "non-finite", "lr-too-high", "exploding-gradients"}
             if f.id == "lr-too-high" else {"loss-flat", "lr-too-low"})
    confirmed = sorted(trial_ids & signs)
    trial = ex.results.get("trial", {})
    first, last = trial.get("first_window_loss"), trial.get("last_window_loss")
    if first is not None and last is not None:
        if f.id == "lr-too-low" and last >= 0.9 * first:
            confirmed.append(f"its loss barely moved: {first:.3g} -> {last:.3g}")
        if f.id == "lr-too-high" and last > first:
            confirmed.append(f"its loss rose: {first:.3g} -> {last:.3g}")
    elif trial and f.id == "lr-too-high" and "val_acc" not in trial:
        confirmed.append("it did not finish")
    if "trial" not in ex.results:
        f.message += " (the sweep alone: run the trial check to confirm it)"
    elif confirmed:
        f.severity = f.evidence["sweep_severity"]
        f.message += f"; the trial run on this config's schedule confirms it ({', '.join(confirmed)})"
    else:
        f.message = (f"the rate sweep puts {ex.cfg.optim.lr:g} outside its range ({f.message}), but the trial run on "
                     f"this config's own schedule ({f.evidence['schedule']}) trained without a sign of it: "
                     "the configured rate works, no change needed")
        f.fix = ""


# ---------------------------------------------------------------------- the trial run


def _trial_dataset(ex: Exam) -> Dataset:
    o, ds = ex.opts, ex.ds
    train = ds.train
    if ds.val is not None:
        val = ds.val
    else:
        keep, held = stratified_split(train.labels, 0.2, o.seed)
        train, val = train.subset(keep), train.subset(held)
    train = train.subset(stratified_subset(train.labels, min(o.trial_images, len(train)), o.seed))
    val = val.subset(stratified_subset(val.labels, min(o.trial_val, len(val)), o.seed))
    return Dataset(ds.name, train, val, val, source=ds.source,
                   splits={"note": "doctor trial run: a training subset; 'test' here is the validation subset",
                           "n_train": len(train), "n_val": len(val),
                           **({"input": ds.splits["input"]} if "input" in ds.splits else {})},
                   fit=ds.fit, bad=ds.bad)  # read as the full run reads them


def check_trial(ex: Exam) -> None:
    from ..fit import Trainer
    from ..training import NonFiniteLoss

    o = ex.opts
    tds = _trial_dataset(ex)
    cfg = copy.deepcopy(ex.cfg)
    bs = epoch_batch_size(cfg.train.batch_size, len(tds.train), cfg.train.min_epoch_steps)
    spe = max(1, len(tds.train) // bs)
    cfg.train.epochs = max(o.trial_epochs, min(50, math.ceil(o.trial_min_steps / spe)))
    total = spe * cfg.train.epochs
    cfg.log.every = max(1, total // 30)
    cfg.train.checkpoint_every, cfg.train.select, cfg.average.ema = 0, "last", 0.0
    cfg.eval.tta, cfg.data.subset = "none", None
    # no report.html: its explanations would read the full test split while the trial evaluates a subset
    cfg.log.report = False
    monitor = TrainingMonitor(every=max(1, total // 15), gap=False, title="doctor trial run")
    trial_dir = ex.out / "trial"
    trainer = Trainer(cfg, out=trial_dir, dataset=tds, callbacks=[monitor], quiet=True)
    try:
        run = trainer.fit()
    except NonFiniteLoss:
        run = None
    for f in (monitor.diagnosis.findings if monitor.diagnosis else []):
        if f.severity != "ok":
            f.message = "in the trial run, " + f.message
            ex.add("trial", f)
    ex.plots += [str(Path("trial") / "plots" / n) for n in ("loss.png", "update_ratios.png", "activations.png")
                 if (trial_dir / "plots" / n).exists()]
    info: dict[str, Any] = {"epochs": cfg.train.epochs, "steps": total, "n_train": len(tds.train),
                            "n_val": len(tds.val)}
    if run is not None and run.summary.get("status") == "completed":
        sub = tds.train.subset(stratified_subset(tds.train.labels, min(2000, len(tds.train)), o.seed))
        tr = evaluate(trainer.model, sub, trainer.normalizer, split="train")
        info.update(train_acc=tr.acc, val_acc=run.summary["test_acc"], train_loss=tr.loss,
                    val_loss=run.summary["test_loss"])
        losses = [w["loss"] for w in monitor.windows if math.isfinite(w["loss"])]
        info.update(first_window_loss=losses[0] if losses else None, last_window_loss=losses[-1] if losses else None)
        for f in gap_findings(tr.acc, info["val_acc"], ex.C, "after the trial run, training accuracy"):
            ex.add("trial", f)
    ex.results["trial"] = info


# ---------------------------------------------------------------------- reconcile


ROOT_CAUSES = ("input-not-normalized", "bad-output", "output-is-probabilities", "symmetric-init", "no-gradient",
               "gradient-check-failed", "lr-too-high", "lr-too-low", "dead-units", "saturated-units",
               "vanishing-gradients", "exploding-gradients", "non-finite-loss", "train-test-overlap")


PRIMARY = ("single-class", "bad-output", "input-not-normalized", "output-is-probabilities", "symmetric-init",
           "gradient-check-failed", "train-test-overlap")


def at_chance(val_acc: float, chance: float, n_val: int) -> bool | None:
    """Whether a validation accuracy is within the noise of guessing: at most 3 standard errors of a chance-level
    binomial over `n_val` images (and at least 5 points) above chance. None when the images are too few to tell:
    even all of them right would be within that noise."""
    margin = max(0.05, 3 * math.sqrt(chance * (1 - chance) / max(n_val, 1)))
    if chance + margin >= 1:
        return None
    return val_acc <= chance + margin


RATE_CONSEQUENCES = ("dead-units", "cannot-overfit", "loss-flat", "loss-diverging", "loss-noisy",
                     "exploding-gradients", "non-finite-loss", "non-finite")
RATIO_TOO_HIGH = 0.05  # one update moving the weights by 5% of their norm: 50x the course's rule of thumb (0.1%)


def rate_as_cause(ex: Exam) -> None:
    """When units die or the network cannot overfit (or the loss blows up or stalls), ask whether the learning rate
    explains it: one update's size relative to the weights in the first steps (the course's ratio, about 1e-3 when
    healthy) and the range test. If it does, the rate is the primary cause and the rest are its consequences."""
    symptoms = [f for f in ex.findings if f.id in RATE_CONSEQUENCES and f.severity in ("warn", "error")]
    if not symptoms:
        return
    first = (ex.results.get("overfit") or {}).get("first_update_ratio")
    at_lr = ex.results.get("update_ratio")
    ratios = [r for r in (first, at_lr) if isinstance(r, float)]
    ratio = max(ratios) if ratios else None
    normed = any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm)
                 for m in ex.new_model().modules())
    limit = RATIO_TOO_HIGH * (4 if normed else 1)  # normalized networks tolerate larger steps (about 10%)
    rate = [f for f in ex.findings if f.id == "lr-too-high" and f.severity in ("info", "warn", "error")]
    suspected = bool(rate and rate[0].severity in ("warn", "error"))
    # a large first step alone is weak evidence (a 2-unit layer moves a lot at any rate): it convicts the rate when
    # the model is shown fine (Adam at 1e-3 memorizes what the configured optimizer could not), or when one step
    # moves the weights by more than their own norm, and units already dead at initialization have another cause
    model_fine = bool((ex.results.get("overfit_reference") or {}).get("success"))
    born_dead = any(f.id == "dead-units" and f.check == "model" and f.severity in ("warn", "error")
                    for f in ex.findings)
    if not (suspected or (ratio is not None and not born_dead and (ratio >= 1.0 or (ratio >= limit and model_fine)))):
        return
    lr = ex.cfg.optim.lr
    said = ("" if ratio is None else f"one update changes the weights by {ratio:.0%} of their norm in the first steps "
            "(the course's rule of thumb is about 0.1%)" if math.isfinite(ratio) else
            "the first updates make the weights non-finite")
    names = ", ".join(dict.fromkeys(f.id for f in symptoms))
    res = ex.results.get("lr_range")
    fix = (f"lower it: --lr {res.suggested:.2g} (the range test's suggestion), or 10x lower at a time until the "
           "update/weight ratio is near 1e-3" if res is not None and res.suggested else
           "lower it 10x at a time until one update changes the weights by about 0.1% of their norm")
    ev = {} if ratio is None else {"first_update_ratio": float(f"{ratio:.3g}") if math.isfinite(ratio) else "inf"}
    if rate:
        f = rate[0]
        f.severity = "error"
        f.message = f"the learning rate is the primary cause of {names}: " + (f"{said}; " if said else "") + f.message
        f.evidence = {**f.evidence, **ev}
        f.fix = f.fix or fix
    else:  # reached only with a measured ratio
        ex.add("reconcile", Finding("lr-too-high", "error", f"the learning rate {lr:g} is the primary cause of "
                                    f"{names}: {said}", {"configured_lr": lr, **ev}, fix))
    for f in symptoms:
        f.severity = "warn"
        if "consequence of" not in f.message:
            f.message += " (a consequence of the learning rate: lr-too-high)"


def reconcile(ex: Exam) -> None:
    """Join the evidence of separate checks into conclusions no single check can draw."""
    _judge_sweep(ex)
    rate_as_cause(ex)
    errors = [f.id for f in ex.findings if f.id in ROOT_CAUSES and f.severity == "error"]
    trial = ex.results.get("trial", {})
    over, ref = ex.results.get("overfit", {}), ex.results.get("overfit_reference", {})
    can_fit = over.get("success") or ref.get("success")
    chance = 1.0 / ex.C
    cannot = next((f for f in ex.findings if f.id == "cannot-overfit" and f.severity == "error"), None)
    if cannot is not None and errors:
        cannot.severity = "warn"
        cannot.message += f" (explained by: {', '.join(dict.fromkeys(errors))})"
    if "val_acc" in trial and not errors:
        guessing = at_chance(trial["val_acc"], chance, trial["n_val"])  # None: too few images to tell
        weak = trial["train_acc"] < chance + 0.5 * (1 - chance) and trial["train_acc"] - trial["val_acc"] < 0.1
        ev = {"val_acc": round(trial["val_acc"], 4), "train_acc": round(trial["train_acc"], 4),
              "chance": round(chance, 4), "overfits_tiny_subset": bool(can_fit)}
        if guessing is None:
            ex.add("reconcile", Finding(
                "small-val-set", "info",
                f"the trial run's {trial['n_val']} validation image(s) are too few to tell its accuracy "
                f"({trial['val_acc']:.1%}) from guessing ({chance:.1%}): whether the labels can be learned, and how "
                f"well the model generalizes, is not judged", {**ev, "n_val": trial["n_val"]},
                "collect more images per class (a few dozen at least), or give a larger validation split "
                "(--set data.val_fraction=0.2)",
            ))
        if guessing and can_fit:
            ex.findings = [f for f in ex.findings if f.id not in ("underfitting", "loss-flat")]
            ex.add("reconcile", Finding(
                "labels-not-learnable", "error",
                f"validation accuracy stays at chance ({trial['val_acc']:.1%}; chance {chance:.1%}) although the "
                f"model memorizes a small subset and nothing else is broken: the labels do not follow from the "
                f"images in any way this model can find (shuffled or misaligned labels, or a model blind to the "
                f"structure, such as a linear classifier on shifted patterns)", ev,
                "check that images and labels are read in the same order and look at a few images with their labels; "
                "if the labels are right, try a convolutional model (--model convnet)",
            ))
        elif weak and not can_fit:
            ex.findings = [f for f in ex.findings if f.id != "underfitting"]
            if cannot is not None:
                cannot.severity = "warn"
                cannot.message += " (explained by: underfitting)"
            ex.add("reconcile", Finding(
                "underfitting", "error",
                f"the model is too small for the task: it cannot memorize {ex.opts.overfit_examples} examples, "
                f"and after the trial run it gets only {trial['train_acc']:.1%} of the training images "
                f"right (chance {chance:.1%}), no better than validation",
                ev, "use a bigger model (more units/channels or layers), train longer, and lower the regularization",
            ))
    # A primary cause at error makes the other errors likely consequences: report them one level lower.
    primary = [f.id for f in ex.findings if f.id in PRIMARY and f.severity == "error"]
    if primary:
        for f in ex.findings:
            if f.severity == "error" and f.id not in PRIMARY:
                f.severity = "warn"
                f.message += f" (possibly a consequence of: {', '.join(dict.fromkeys(primary))})"
    if any(f.severity == "error" for f in ex.findings):  # a short trial's weak accuracy says nothing more then
        ex.findings = [f for f in ex.findings if not (f.id == "underfitting" and f.severity == "info")]
    # Keep one finding per id: the most severe, with the others' evidence attached.
    best: dict[str, Finding] = {}
    for f in ex.findings:
        cur = best.get(f.id)
        if cur is None or f.rank > cur.rank:
            if cur is not None and cur.severity != "ok":
                f.evidence = {**f.evidence, "also": cur.message}
            best[f.id] = f
        elif f.severity != "ok":
            cur.evidence = {**cur.evidence, "also": f.message}
    ex.findings = [f for f in ex.findings if best[f.id] is f]


CHECKS: dict[str, Callable[[Exam], None]] = {
    "data": check_data,
    "model": check_model,
    "initial-loss": check_initial_loss,
    "regularization": check_regularization,
    "gradient-check": check_gradients,
    "overfit": check_overfit,
    "lr-range": check_lr_range,
    "trial": check_trial,
}


def examine(
    data: str | Dataset | None = None,
    *,
    model: str | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    config: Config | None = None,
    out: str | Path | None = None,
    options: ExamOptions | None = None,
    console=None,
) -> Diagnosis:
    """Examine the setup `visrec train` would run with the same arguments; write doctor.md and plots to `out`."""
    cfg, ds = setup_config(data, preset=preset, overrides=overrides, config=config, model_name=model)
    opts = options or ExamOptions()
    unknown = [c for c in (opts.checks or ()) if c not in CHECKS]
    if unknown:
        raise VisrecError(f"unknown doctor check(s) {', '.join(unknown)}", f"valid: {', '.join(CHECKS)}")
    set_threads(cfg.device.threads)
    device = resolve_device(cfg.device.name)
    if ds is None:
        ds = dataset_from_config(cfg)
    if out is None:
        from ..runs import default_run_name

        out = Path("runs") / ("doctor-" + default_run_name(cfg.data.name, cfg.model.name))
    out = Path(out)
    if (out / "trial").exists():
        if not (out / "doctor.md").exists():
            raise VisrecError(f"{out} holds a 'trial' folder that the doctor did not write",
                              "choose another --out for the doctor")
        shutil.rmtree(out / "trial")  # an earlier examination's trial run, replaced by this one
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", cfg.anchored().to_dict())
    ex = Exam(cfg, ds, out, opts, device=device)
    timings: dict[str, dict[str, Any]] = {}
    from ..tasks import create_task

    task = create_task(cfg.task.name, cfg)
    if not task.class_scores:  # the checks that carry over, through the task's own loss and metric
        from .task_exam import run_task_checks

        timings = run_task_checks(ex, task, console)
    for name, fn in (CHECKS.items() if task.class_scores else ()):  # the full exam, on class scores
        if opts.checks is not None and name not in opts.checks:
            continue
        if ex.abort:
            timings[name] = {"status": "skipped (an earlier check found a blocking problem)", "seconds": 0.0}
            continue
        t0 = time.perf_counter()
        if console is not None:
            console.print(f"[dim]doctor: {name}...[/dim]")
        n_before = len(ex.findings)
        fn(ex)
        new = ex.findings[n_before:]
        worst = max((f.rank for f in new), default=0)
        timings[name] = {"status": SEVERITIES[worst], "seconds": time.perf_counter() - t0}
    if task.class_scores:
        reconcile(ex)
    stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    diag = Diagnosis(ex.findings, checks=timings, results=ex.results, out=out,
                     title=f"visrec doctor: {ds.name}, model {cfg.model.name} ({stamp})")
    rel = [str(Path(p).relative_to(out)) if str(p).startswith(str(out)) else str(p) for p in ex.plots]
    write_text(out / "doctor.md", diag.to_markdown(rel))
    write_text(out / "findings.json", diag.to_json() + "\n")
    return diag

