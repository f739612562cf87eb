"""Ensembles of trained runs: every member, the probability average, the majority vote, and the parameter
average of checkpoints of one run (with batch-norm statistics recomputed on the training data).

Members are run folders, optionally with the checkpoint to use: `RUN` (the weights the run was evaluated
with), `RUN:last`, `RUN:best`, `RUN:snapshotK`, or `RUN:snapshots` for all snapshots of a cyclic schedule (a
snapshot ensemble). They must share the dataset, its split seeds and class names, so they are
evaluated on the very same images.

The vote counts each member's top class; a tie goes to the tied class with the highest average
probability. Parameter averaging only makes sense for weights on one path of one training run (the course's
"average the checkpoints"): independently trained networks order their units differently, so it is offered
only when every member is a checkpoint of the same run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import VisrecError
from .evaluate import predict_logits, resolve_crop_pad, resolve_tta
from .runs import dataset_from_config, expand_refs, remap_classes
from .tasks import task_class
from .training.averaging import recompute_batchnorm


@dataclass
class EnsembleReport:
    split: str
    members: list[dict[str, Any]] = field(default_factory=list)  # {"member", "acc"}
    combined: dict[str, float] = field(default_factory=dict)  # "probability average", "majority vote", ...

    @property
    def best_member_acc(self) -> float:
        return max(m["acc"] for m in self.members)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "members": self.members, "combined": self.combined,
                "best_member_acc": self.best_member_acc,
                "gain_over_best_member": {k: v - self.best_member_acc for k, v in self.combined.items()}}


def majority_vote(probs: torch.Tensor) -> torch.Tensor:
    """(members, N, C) probabilities -> (N,) the most voted class; ties to the highest mean probability."""
    m, n, c = probs.shape
    votes = torch.zeros(n, c).scatter_add_(1, probs.argmax(2).T, torch.ones(n, m))
    return (votes * 2 + probs.mean(0)).argmax(1)  # mean probability < 1 < one vote: it only breaks ties


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating tensors; integer ones (e.g. BN's num_batches_tracked) from the first."""
    keys = set(states[0])
    if any(set(s) != keys for s in states[1:]):
        raise VisrecError("the members' weights have different names", "average checkpoints of one architecture")
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
            if states[0][k].is_floating_point() else states[0][k].clone() for k in states[0]}


def ensemble(members: list[str | Path], split: str = "test", *, batch_size: int = 0,
             tta: str | None = None) -> EnsembleReport:
    """Evaluate each member and their combinations on one split of their common dataset.

    `tta` None evaluates each member as its run was evaluated (`eval.tta`, e.g. flips for models trained with
    flips), so member accuracies match their summaries; "none" or "flip" forces one mode for all."""
    refs = expand_refs(members)
    if len(refs) < 2:
        raise VisrecError("an ensemble needs at least two members", "give two or more run folders, or RUN:snapshots")
    loaded = [(r.run, r.which) for r in refs]
    other = [run for run, _ in loaded if not task_class(run.config.task.name).class_scores]
    if other:
        raise VisrecError(f"{other[0].path} is a {other[0].config.task.name} run: ensembles average the class "
                          "probabilities of classification runs", "give classification runs")
    first = loaded[0][0].config
    for run, _ in loaded[1:]:
        a, b = first.anchored().data, run.config.anchored().data  # one folder, however each run named it
        differ = [f"data.{k} ({getattr(b, k)!r} against {getattr(a, k)!r})" for k in SAME_DATA
                  if getattr(a, k) != getattr(b, k)]
        if differ:
            raise VisrecError(f"{run.path} was trained on other data, splits or inputs than {loaded[0][0].path}: "
                              + ", ".join(differ),
                              "ensemble runs of one dataset with the same splits, image size and channels")
    ds = dataset_from_config(first)
    data = ds.split(split) if split != "val" or ds.val is not None else None
    if data is None:
        raise VisrecError("the members have no validation split", "use --split test")
    lms = [run.load_model(which, "cpu") for run, which in loaded]
    for (run, _), lm in zip(loaded, lms, strict=True):
        if lm.classes != lms[0].classes:
            raise VisrecError(f"{run.path} has other classes than {loaded[0][0].path}",
                              f"{lm.classes} vs {lms[0].classes}")
    data = remap_classes(data, lms[0].classes)
    report = EnsembleReport(split)
    probs = []
    modes = [resolve_tta(tta or run.config.eval.tta, run.config.data.augment) for run, _ in loaded]
    for (run, which), lm, mode in zip(loaded, lms, modes, strict=True):
        pad = resolve_crop_pad(run.config.eval.crop_pad, run.config.data.augment)
        p = predict_logits(lm.model, data.images, lm.normalizer, batch_size=batch_size, tta=mode,
                           crop_pad=pad).softmax(1)
        probs.append(p)
        report.members.append({"member": f"{run.path}:{which}", "acc": _acc(p.argmax(1), data.labels)})
    stacked = torch.stack(probs)
    report.combined["probability average"] = _acc(stacked.mean(0).argmax(1), data.labels)
    report.combined["majority vote"] = _acc(majority_vote(stacked), data.labels)
    if len({run.path.resolve() for run, _ in loaded}) == 1:  # checkpoints of one run: average the weights
        avg = copy.deepcopy(lms[0].model)
        avg.load_state_dict(average_state_dicts([lm.model.state_dict() for lm in lms]))
        recompute_batchnorm(avg, ds.train.images, lms[0].normalizer)
        pad = resolve_crop_pad(first.eval.crop_pad, first.data.augment)
        logits = predict_logits(avg, data.images, lms[0].normalizer, batch_size=batch_size, tta=modes[0],
                                crop_pad=pad)
        report.combined["parameter average"] = _acc(logits.argmax(1), data.labels)
    return report


# What members must share: the data evaluated is read once, with the first member's settings.
SAME_DATA = ("name", "split_seed", "val_fraction", "test_fraction", "subset", "image_size", "channels", "classes")


def _acc(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return (pred == labels).float().mean().item()
