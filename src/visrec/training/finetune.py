"""Fine-tune mechanics: which parameters train in which epoch and at which learning rate, and the feature cache of
the linear probe. The strategies are described in `visrec.transfer`, which holds the user-facing `finetune()`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import FinetuneConfig
from ..data import Normalizer
from ..errors import VisrecError
from ..io import atomic_path

STRATEGIES = ("none", "linear", "last", "full", "two_stage")


def check_finetune(cfg: FinetuneConfig, has_weights: bool) -> None:
    if cfg.strategy != "none" and not has_weights:
        raise VisrecError(f"finetune.strategy={cfg.strategy} needs weights to start from",
                          "give model.weights (a run folder or weight file), or set model.pretrained=true "
                          "with a timm model, e.g. visrec finetune timm:resnet18 DATA")


def _head(model: nn.Module) -> nn.Module:
    if not hasattr(model, "get_classifier"):
        raise VisrecError(f"{type(model).__name__} has no get_classifier(): transfer needs the common model surface",
                          "build the model with visrec.models.create_model")
    return model.get_classifier()


@torch.no_grad()
def stage_groups(model: nn.Module, example: torch.Tensor) -> tuple[list[list[str]], list[str]]:
    """Parameter names by stage, input side first, and the head's parameter names.

    A parameter belongs to the stage whose output (one of `stage_paths`) is the first to be computed after its
    module runs, found by one forward pass of `example`; what runs after the last stage (and outside the head,
    e.g. VGG's fc6/fc7) and what never runs joins the last stage. A model without `stage_paths` has one stage."""
    head_names = {n for n, _ in _named_under(model, _head(model))}
    paths = list(getattr(model, "stage_paths", ()))
    order: dict[str, int] = {}
    done = [0]

    def finished(module, inputs, output) -> None:
        done[0] += 1

    def started(name: str):
        def hook(module, inputs) -> None:
            order.setdefault(name, done[0])
        return hook

    hooks = []
    for name, module in model.named_modules():
        if name in paths:
            hooks.append(module.register_forward_hook(finished))
        if any(True for _ in module.parameters(recurse=False)):
            hooks.append(module.register_forward_pre_hook(started(name)))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n_stages = max(len(paths), 1)
    groups: list[list[str]] = [[] for _ in range(n_stages)]
    for name, _ in model.named_parameters():
        if name in head_names:
            continue
        module = name.rpartition(".")[0]
        groups[min(order.get(module, n_stages - 1), n_stages - 1)].append(name)
    return [g for g in groups if g], sorted(head_names)


def _named_under(model: nn.Module, sub: nn.Module) -> list[tuple[str, nn.Parameter]]:
    ids = {id(p) for p in sub.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


@dataclass
class Finetune:
    """What trains when, and at which learning rate, for one strategy."""

    cfg: FinetuneConfig
    stages: list[list[str]]  # input side first
    head: list[str]

    @classmethod
    def build(cls, model: nn.Module, cfg: FinetuneConfig, in_chans: int, image_size: tuple[int, int]) -> Finetune:
        device = next(model.parameters()).device
        stages, head = stage_groups(model, torch.zeros(2, in_chans, *image_size, device=device))
        return cls(cfg, stages, head)

    def lr_factors(self) -> dict[str, float]:
        """Parameter name -> factor of optim.lr: 1 for the head, backbone_lr * stage_decay**k for the k-th stage
        counted from the head (k = 0 next to it)."""
        out = dict.fromkeys(self.head, 1.0)
        for k, names in enumerate(reversed(self.stages)):
            out.update(dict.fromkeys(names, self.cfg.backbone_lr * self.cfg.stage_decay ** k))
        return out

    def frozen(self, epoch: int) -> set[str]:
        """Names of parameters that do not train in 0-based `epoch`."""
        s = self.cfg.strategy
        backbone = {n for g in self.stages for n in g}
        if s == "linear" or (s == "two_stage" and epoch < self.cfg.head_epochs):
            return backbone
        if s == "last":
            return {n for g in self.stages[: max(len(self.stages) - self.cfg.stages, 0)] for n in g}
        return set()

    def apply(self, model: nn.Module, epoch: int) -> None:
        """Freeze for `epoch`: requires_grad off, and modules whose parameters are all frozen in eval mode (so
        their batch-norm statistics stay as they were). Call with the model in train mode."""
        frozen = self.frozen(epoch)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        if not frozen:
            return
        for module in model.modules():
            own = [n for n, _ in _named_under(model, module)]
            if own and all(n in frozen for n in own):
                module.eval()
            elif not own and any(True for _ in module.buffers(recurse=False)):
                module.eval()  # buffers without parameters (affine-free norms) follow their frozen neighbours

    def describe(self) -> str:
        s, c = self.cfg.strategy, self.cfg
        n = len(self.stages)
        if s == "linear":
            return f"linear classifier on cached features of the frozen network ({n} stages frozen)"
        if s == "last":
            k = min(c.stages, n)
            return f"fine-tune the last {k} of {n} stages at {c.backbone_lr:g}x lr (the rest frozen) and the head"
        rates = ", ".join(f"{c.backbone_lr * c.stage_decay ** k:g}" for k in range(n))
        lead = f"head alone for {c.head_epochs} epoch(s), then " if s == "two_stage" else ""
        return f"{lead}everything: head at 1x lr, stages (from the head down) at {rates}x"


# ---------------------------------------------------------------- feature cache for the linear classifier

def cache_dir(cfg: FinetuneConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("VISREC_CACHE")
    return Path(env).expanduser() / "features" if env else Path.home() / ".cache" / "visrec" / "features"


def _digest(tensors: dict[str, torch.Tensor], extra: Any) -> str:
    h = hashlib.sha256(repr(extra).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.inference_mode()
def extract_features(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, batch_size: int = 512,
                     channels_last: bool = False) -> torch.Tensor:
    """Penultimate features (the classifier's input) of uint8 images, in eval mode, as float32 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for chunk in images.split(batch_size):
        x = normalizer(chunk.to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().flatten(1).cpu())
    model.train(was_training)
    return torch.cat(out)


def cached_features(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, folder: Path,
                    channels_last: bool = False) -> tuple[torch.Tensor, bool]:
    """(features, whether they came from the cache). The cache key covers the backbone's weights and buffers,
    the images and the preprocessing, so a changed network or dataset never reuses stale features."""
    head = {id(p) for p in _head(model).parameters()}
    backbone = {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in head}
    # images in their files (streamed) are named by their files' digest, not read twice
    files = None if isinstance(images, torch.Tensor) else images.fingerprint()
    key = _digest({**{f"w.{k}": v for k, v in backbone.items()}, **({"images": images} if files is None else {})},
                  (type(model).__name__, normalizer.state(), files))
    path = folder / f"{key[:40]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["features"], True
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed and replaced
            path.unlink(missing_ok=True)
    feats = extract_features(model, images, normalizer, channels_last=channels_last)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp))
    return feats, False
