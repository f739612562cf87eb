"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint TAG in a folder is up to four files, each written atomically:

    TAG.safetensors        the model's weights (a plain state_dict, loadable by any safetensors reader)
    TAG.ema.safetensors    the averaged weights, when EMA is on
    TAG.state.safetensors  optimizer tensors and RNG states (only for resumable checkpoints)
    TAG.json               epoch, step, class names, preprocessing, optimizer/schedule state, and the
                           SHA-256 of each file above; written last, so it marks a complete checkpoint
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import VisrecError
from ..io import atomic_path, write_json

FORMAT_VERSION = 1


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    return sha256_of(path)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of the underlying module (unwrapping torch.compile)."""
    return getattr(model, "_orig_mod", model).state_dict()


def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state -> (tensors for safetensors, the JSON rest)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    folder: Path,
    tag: str,
    model: nn.Module,
    meta: dict[str, Any],
    *,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `tag` into `folder`; returns the path of its JSON file.

    `meta` must be JSON-ready (epoch, step, classes, preprocessing, ...). With `optimizer` and `rng`
    the checkpoint can resume training; without them it only holds weights (e.g. `best`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    files["weights"] = {"file": f"{tag}.safetensors",
                        "sha256": _save_tensors(model_state(model), folder / f"{tag}.safetensors")}
    if ema is not None:
        files["ema"] = {"file": f"{tag}.ema.safetensors",
                        "sha256": _save_tensors(model_state(ema), folder / f"{tag}.ema.safetensors")}
    doc = {"format": FORMAT_VERSION, **meta}
    if optimizer is not None:
        tensors, opt_meta = _split_optimizer(optimizer)
        tensors.update({f"rng.{k}": v for k, v in (rng or {}).items()})
        files["state"] = {"file": f"{tag}.state.safetensors",
                          "sha256": _save_tensors(tensors, folder / f"{tag}.state.safetensors")}
        doc["optimizer"] = opt_meta
    doc["files"] = files
    write_json(folder / f"{tag}.json", doc)
    return folder / f"{tag}.json"


@dataclass
class Checkpoint:
    path: Path  # the JSON file
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Checkpoint({self.path}, epoch={self.meta.get('epoch')}, step={self.meta.get('step')})"


def _load_verified(folder: Path, entry: dict[str, str]) -> dict[str, torch.Tensor]:
    path = folder / entry["file"]
    if not path.is_file():
        raise VisrecError(f"checkpoint file {path} is missing", "the run folder is incomplete; use another checkpoint")
    if sha256_of(path) != entry["sha256"]:
        raise VisrecError(f"checkpoint file {path} is corrupt (its SHA-256 does not match the one recorded)",
                          "use another checkpoint (e.g. best instead of last)")
    return load_file(str(path))


def load_checkpoint(folder: Path, tag: str, *, with_state: bool = False) -> Checkpoint:
    """Read and verify checkpoint `tag`; `with_state` also loads the optimizer and RNG tensors."""
    path = folder / f"{tag}.json"
    if not path.is_file():
        raise VisrecError(f"no checkpoint {path}", "has this run saved a checkpoint yet?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VisrecError(f"checkpoint {path} is not valid JSON: {e}") from None
    files = meta.get("files", {})
    ckpt = Checkpoint(path, meta, _load_verified(folder, files["weights"]))
    if "ema" in files:
        ckpt.ema = _load_verified(folder, files["ema"])
    if with_state:
        if "state" not in files:
            raise VisrecError(f"checkpoint {path} holds weights only and cannot resume training", "resume from last")
        tensors = _load_verified(folder, files["state"])
        ckpt.optimizer = _join_optimizer(tensors, meta["optimizer"])
        ckpt.rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return ckpt
