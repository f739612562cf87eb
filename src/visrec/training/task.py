"""The task seam: all the training loop knows of a task. Tasks themselves live in `visrec.tasks`.

A task says what one image's target is, how the model's output on a batch becomes a loss and a few running
statistics (summed on the device, no host syncs), how a split is evaluated and which of its metrics is primary
(it selects the best checkpoint, is the search's objective, and heads summary.json and `visrec runs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import Config, coerce_options
from ..data import Dataset, ImageSet, Normalizer
from ..distributed import Dist
from ..errors import VisrecError
from ..prediction import Predictor
from ..run_store import RunFolder
from .context import StepContext


@dataclass
class EvalSettings:
    """How the loop runs evaluation: a task may use them or not."""

    batch_size: int = 1024  # the loop and `visrec eval` pass evaluate.eval_batch_size(eval.batch_size, ...)
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    shard: Dist | None = None  # across processes: each rank evaluates its share (a task that supports it)
    say: Callable[[str], None] | None = None  # where a long evaluation tells what it is doing (None: silent)

    def note(self, text: str) -> None:
        if self.say is not None:
            self.say(text)


@dataclass
class Evaluation:
    """A split's metrics (`loss` among them when the task has one), as a task without files of its own reports them."""

    split: str
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, **self.metrics}

    def save(self, folder: Path) -> None:
        """Files of the evaluation in the run folder; a task with only numbers writes none."""


@dataclass
class NoOptions:
    """A task without options of its own."""


class Task:
    """One kind of learning problem, as the loop sees it. Subclass it and register it in `visrec.tasks`.

    `stats` name the per-batch sums `batch_stats` returns; divided by the images seen, they become the fields
    of the training records next to `loss` (classification: `acc`).
    """

    name: ClassVar[str] = ""
    target: ClassVar[str] = "class"  # class | value | boxes | masks | semantic | tokens
    primary: ClassVar[str] = "acc"  # the metric that selects checkpoints and trials
    maximize: ClassVar[bool] = True  # whether a higher primary metric is better
    stats: ClassVar[tuple[str, ...]] = ()
    loss_falls: ClassVar[bool] = True  # whether a loss that does not fall means nothing was learned (not a GAN's)
    # ---- capabilities: what the loop, averaging, search, the doctor, ensembles and explanations ask the task,
    # instead of naming it
    # whether training may read streamed images as random-resized crops of the originals (False: the targets are in
    # the images' pixels, so they are read whole, fitted as evaluation fits them)
    random_crops: ClassVar[bool] = True
    # the model's output is one score per class: ensembles average them, the explanations and the ONNX backend read
    # them, and the doctor runs its full classification exam on them
    class_scores: ClassVar[bool] = False
    progressive_resize: ClassVar[bool] = False  # train.progressive_size may shrink the images (targets not in pixels)
    ddp_unused_parameters: ClassVar[bool] = True  # some parameters may get no gradient in a step: DDP looks for them
    raw_pixels: ClassVar[bool] = False  # the model scales raw 0..255 pixels itself: the doctor asks no normalization
    overfit_metric: ClassVar[str | None] = None  # what the doctor's memorization check reads (None: the primary)
    sequence_model: ClassVar[bool] = False  # the model decodes step by step: the doctor checks gradients through time
    # visrec search's default space for the task, as in a search file (None: visrec.tune's general one)
    search_space: ClassVar[dict[str, dict] | None] = None
    # the values the task's models train under (config keys), between the built-in defaults and a preset, with a
    # model of the task's kind so `--task` alone trains; and per model name, values over those
    recipe: ClassVar[dict[str, Any]] = {}
    model_recipes: ClassVar[dict[str, dict[str, Any]]] = {}
    # distill.teachers: the outputs are class scores a teacher ensemble's probabilities can be matched to
    distills: ClassVar[bool] = False
    # finetune.strategy=linear: the model's classifier (get_classifier) is the whole head of the task
    linear_probe: ClassVar[bool] = False
    # evaluation compares test-time augmentation modes, with a confusion matrix (`visrec eval --tta`)
    tta_eval: ClassVar[bool] = False
    # what a trained run answers: the task's visrec.prediction.Predictor subclass (None: the task's runs make no
    # predictions from images; `predict_hint` says what to do instead)
    Predictor: ClassVar[type[Predictor] | None] = None
    predict_hint: ClassVar[str] = ""

    # the task's own options (`task.KEY` in a config): a dataclass typed like a config section, with defaults
    Options: ClassVar[type] = NoOptions

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg if cfg is not None else Config()
        # checked and converted again here: a config built by hand (not resolved) meets the same rules
        self.options = self.Options(**coerce_options(self.Options, self.cfg.task.options,
                                                     self.name or self.cfg.task.name, "task options"))

    def predictor(self, run: RunFolder, **options: Any) -> Predictor:
        """The run's model loaded to answer for images (see visrec.prediction): the library's `Run.predict`,
        `visrec predict`, `visrec serve` and the report's examples all ask it."""
        if self.Predictor is None:
            raise VisrecError(f"{run.path} is a {self.name} run: it makes no predictions from images",
                              self.predict_hint.format(run=run.path) or "see its report.html")
        return self.Predictor(self, run, **options)

    def optimizers(self, model: nn.Module, build: Callable[[nn.Module, float], torch.optim.Optimizer]
                   ) -> dict[str, torch.optim.Optimizer] | None:
        """Named optimizers for a model whose parts learn from separate losses (a GAN's critic and generator), each
        made by `build(part, lr_scale)` with the run's optimizer settings; None: one optimizer over the model."""
        return None

    def statistics_forward(self, model: nn.Module, x: torch.Tensor) -> None:
        """One training-mode forward pass on a normalized batch whose only purpose is batch norm's running
        statistics (SWA's recalibration of the averaged weights): the model's forward; a task whose model needs
        targets in training (a detector) says here what runs instead."""
        model(x)

    def train_step(self, xb: torch.Tensor, yb: Any, ctx: StepContext) -> tuple[Any, torch.Tensor, Any, bool]:
        """One optimizer step on a batch -> (outputs, loss, targets, whether the step was taken). The default is the
        loop's: the forward pass, then one update of every parameter (`ctx.update`: noise, clipping, the non-finite
        policy); a task with several optimizers alternates updates here (see visrec.training.context)."""
        out, loss, target = ctx.forward(xb, yb)
        return out, loss, target, ctx.update(loss)

    def chance_loss(self, outputs: int, targets: Any = None) -> float | None:
        """The loss of a model that knows nothing, for the doctor's initial-loss check (`outputs`: the model's output
        count); None: the task has no such number."""
        return None

    def check(self, ds: Dataset) -> None:
        """Refuse, with a clear error, data this task cannot learn from."""

    def num_outputs(self, ds: Dataset) -> int:
        """The width of the model's head for this data."""
        return ds.num_classes

    def check_model(self, model: nn.Module, ds: Dataset) -> None:
        """Refuse a model whose head cannot produce this task's outputs (here: a detector, for a task that is
        not detection)."""
        if getattr(model, "detector", False):
            kind = "instance" if getattr(model, "masks", False) else "detection"
            raise VisrecError(f"{self.cfg.model.name} is a {kind} model: it outputs boxes, not what task "
                              f"{self.name} learns from", f"train it with --task {kind} on data with boxes (scenes, "
                              "coco:PATH, yolo:PATH), or pick a classifier for this task (visrec models)")

    def model_kwargs(self, ds: Dataset, model_name: str) -> dict[str, Any]:
        """Model options fitted to the data (a detector's anchor sizes); the user's `model.kwargs` override them,
        and the run's config records them, so the run's model is rebuilt the same way."""
        return {}

    def targets(self, data: ImageSet) -> Any:
        """The per-image targets the batches slice alongside the images: a tensor, or a dict of tensors."""
        return data.labels

    def forward(self, model: nn.Module, x: torch.Tensor, targets: Any) -> Any:
        """The model's output for a training batch; a model that computes its own losses (torchvision's
        detectors) takes the targets here."""
        return model(x)

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        raise NotImplementedError

    def batch_stats(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """(len(stats),) sums over the batch, on the device (no host sync), of one dtype for every batch."""
        return outputs.new_zeros(len(self.stats))

    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> Evaluation:
        raise NotImplementedError

    def summary_fields(self, test: Evaluation | None) -> dict[str, Any]:
        """Task-specific entries of summary.json."""
        return {}

    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 8,
                folder: Path | None = None) -> dict[str, bytes]:
        """The task's sections of report.html: title -> PNG, drawn from the first `n` images of `data` (and from
        the files the test evaluation saved in the run `folder`)."""
        return {}

    @torch.no_grad()
    def examples(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """For figures: the first `n` images of `data` (uint8), the model's outputs on them (one tensor per image,
        on the CPU) and their targets; None when `data` is empty."""
        from ..evaluate import predict_logits

        n = min(n, len(data))
        if n == 0:
            return None
        x8 = data.images[:n]
        targets = self.targets(data)
        targets = {k: v[:n] for k, v in targets.items()} if isinstance(targets, dict) else targets[:n]
        return x8, predict_logits(model, x8, normalizer).cpu(), targets

    def at_chance(self, test: Evaluation, ds: Dataset) -> str | None:
        """A sentence when the test result is no better than guessing (the end of training warns with it)."""
        return None

    def better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.maximize else value < than)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, primary={self.primary!r})"
