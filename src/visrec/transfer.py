"""Transfer learning: start from a trained network and adapt it to new data, with the course's strategies.

    linear     a linear classifier on features of the frozen network: the features of every image are
               extracted once and cached on disk, then only the classifier trains (seconds)
    last       fine-tune the last `finetune.stages` stages and the head; earlier stages stay frozen
    full       fine-tune everything, with per-stage learning rates
    two_stage  train the head alone for `finetune.head_epochs` epochs, then everything (per-stage rates)

Per-stage learning rates: the head trains at optim.lr, the stage next to it at optim.lr * backbone_lr, and each
stage further from the head at stage_decay times the one above it. Frozen stages keep their parameters and their
batch-norm statistics unchanged (their modules run in eval mode).

The source is a visrec run folder (`RUN`, `RUN:best`), a weight file (.safetensors, or a .pt state_dict) for a
named model, or `timm:NAME` (ImageNet weights from timm, when it is installed). The classifier always starts
fresh: the new classes mean something else even when their number is the same.

    visrec finetune runs/pretrained fashion-mnist --strategy linear --set data.subset=500
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, parse_override, resolve_config
from .errors import VisrecError
from .runs import RunRef

# ---------------------------------------------------------------- the library entry point

def finetune_config(source: str, data: str, strategy: str, *, model: str | None = None, preset: str | None = None,
                    overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """The config of a fine-tuning run: the preset (default recipe), then the source's architecture, preprocessing
    mode and (when it set them) image size and channels, then overrides."""
    cfg = resolve_config(preset, None)
    cfg.data.name = data
    ref = RunRef.parse(source)
    path = ref.path
    if source.startswith("timm:"):
        cfg.model.name = source
        cfg.model.pretrained = True
    elif ref.is_run:
        src = ref.run.config
        cfg.model.name, cfg.model.kwargs = src.model.name, dict(src.model.kwargs)
        cfg.data.normalize = src.data.normalize
        # the input the network learned: its image size and channels, when the source chose them (--set overrides)
        cfg.data.image_size, cfg.data.channels = src.data.image_size, src.data.channels
        cfg.model.weights = source
    elif path.is_file():
        if not model:
            raise VisrecError(f"{source} is a weight file: name its architecture", "add --model NAME (e.g. resnet18)")
        cfg.model.weights = source
    else:
        raise VisrecError(f"fine-tuning source {source} is neither a run folder, a weight file nor timm:NAME",
                          "give a run folder (runs/NAME), a .safetensors/.pt file with --model, or timm:resnet18")
    if model:
        cfg.model.name = model
    cfg.finetune.strategy = strategy
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        cfg.set(key, value)
    return cfg


def finetune(source: str, data: str, strategy: str = "last", *, model: str | None = None, preset: str | None = None,
             overrides: dict[str, Any] | list[str] | None = None, out: str | Path | None = None,
             progress: bool | None = None, quiet: bool = False):
    """Fine-tune `source` (run folder, weight file with `model`, or timm:NAME) on dataset `data`; returns the Run."""
    from .fit import Trainer

    cfg = finetune_config(source, data, strategy, model=model, preset=preset, overrides=overrides)
    return Trainer(cfg, out=out, progress=progress, quiet=quiet).fit()
