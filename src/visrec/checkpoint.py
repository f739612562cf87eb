"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint TAG in a folder is a generation of files, each written atomically under a name of its own
(GEN = TAG-<step>-<random>), and a JSON file that names them:

    GEN.safetensors        the model's weights (a plain state_dict, loadable by any safetensors reader)
    GEN.ema.safetensors    the exponential moving average of the weights, when EMA is on
    GEN.swa.safetensors    the stochastic weight average, once SWA has started
    GEN.state.safetensors  optimizer tensors and RNG states (only for resumable checkpoints)
    GEN.preprocess.safetensors  the whitening basis of data.normalize=pca|pca_whiten|zca (when used)
    TAG.json               epoch, step, class names, preprocessing, optimizer/schedule state, and the
                           file name and SHA-256 of each file above; written last, so it marks a complete
                           checkpoint
    TAG.prev.json          the previous generation's JSON, kept with its files until the next save
    TAG.safetensors        a hard link to the current weights, for tools that want a fixed name

A save never touches the files the current TAG.json names, so a process killed at any moment (SIGKILL
included) leaves a loadable checkpoint; `load_checkpoint` verifies every file's SHA-256 and falls back to
TAG.prev.json, saying so, when the latest is missing, truncated or corrupt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import VisrecError
from .io import atomic_path, write_bytes, write_json

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
            elif isinstance(v, list | tuple) and any(isinstance(e, torch.Tensor) for e in v):
                # L-BFGS keeps its history as lists of tensors (some entries None until filled)
                for i, e in enumerate(v):
                    if isinstance(e, torch.Tensor):
                        tensors[f"optim.{pid}.{k}#{i}"] = e
                scalars[f"{pid}.{k}"] = {"tensor_list": len(v), "values": {
                    str(i): e for i, e in enumerate(v) if not isinstance(e, torch.Tensor)}}
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    lists: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            if "#" in name:
                name, i = name.rsplit("#", 1)
                lists.setdefault((int(pid), name), {})[int(i)] = v
            else:
                state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        if isinstance(v, dict) and "tensor_list" in v:
            items, rest = lists.get((int(pid), name), {}), v.get("values", {})
            v = [items[i] if i in items else rest.get(str(i)) for i in range(v["tensor_list"])]
        state.setdefault(int(pid), {})[name] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


_OWN_FILES = ("weights", "ema", "swa", "state")


def save_checkpoint(
    folder: Path,
    tag: str,
    model: nn.Module,
    meta: dict[str, Any],
    *,
    ema: nn.Module | None = None,
    swa: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint `tag` into `folder`; returns the path of its JSON file.

    `meta` must be JSON-ready (epoch, step, classes, preprocessing, ...). With `optimizer` and `rng`
    the checkpoint can resume training; without them it only holds weights (e.g. `best`). `extra` names further
    tensor groups saved with it (the preprocessing's whitening basis), read back as `Checkpoint.extra`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write (one writer per run folder)
        stale.unlink(missing_ok=True)
    gen = f"{tag}-{int(meta.get('step', 0)):09d}-{secrets.token_hex(3)}"
    try:
        files: dict[str, dict[str, str]] = {}
        files["weights"] = {"file": f"{gen}.safetensors",
                            "sha256": _save_tensors(model_state(model), folder / f"{gen}.safetensors")}
        for name, module in (("ema", ema), ("swa", swa)):
            if module is not None:
                files[name] = {"file": f"{gen}.{name}.safetensors",
                               "sha256": _save_tensors(model_state(module), folder / f"{gen}.{name}.safetensors")}
        for name, group in (extra or {}).items():
            if name in _OWN_FILES or not name.isidentifier():
                raise ValueError(f"extra tensor group name {name!r} is reserved or not an identifier")
            if group:
                files[name] = {"file": f"{gen}.{name}.safetensors",
                               "sha256": _save_tensors(group, folder / f"{gen}.{name}.safetensors")}
        doc = {"format": FORMAT_VERSION, **meta}
        if optimizer is not None:
            tensors, opt_meta = _split_optimizer(optimizer)
            tensors.update({f"rng.{k}": v for k, v in (rng or {}).items()})
            files["state"] = {"file": f"{gen}.state.safetensors",
                              "sha256": _save_tensors(tensors, folder / f"{gen}.state.safetensors")}
            doc["optimizer"] = opt_meta
        doc["files"] = files
        current = folder / f"{tag}.json"
        if _readable_json(current):
            write_bytes(folder / f"{tag}.prev.json", current.read_bytes())
        write_json(current, doc)
    except OSError as e:
        for leftover in folder.glob(f"{gen}.*"):
            leftover.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise VisrecError(f"no space left on the device while saving checkpoint {tag!r} in {folder}; the "
                              f"checkpoints saved before are intact", "free some space, then resume the run "
                              "(visrec train --resume RUN)") from None
        raise VisrecError(f"could not save checkpoint {tag!r} in {folder}: {e}",
                          "check that the folder is writable; earlier checkpoints are intact") from None
    _link_fixed_name(folder / f"{gen}.safetensors", folder / f"{tag}.safetensors")
    _remove_unreferenced(folder, tag)
    return current


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (OSError, ValueError):
        return False


def _link_fixed_name(target: Path, alias: Path) -> None:
    """Point `alias` at `target` atomically with a hard link (skipped where links are not supported)."""
    tmp = alias.with_name(f".{alias.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(target, tmp)
        os.replace(tmp, alias)
    except OSError:
        tmp.unlink(missing_ok=True)


def _remove_unreferenced(folder: Path, tag: str) -> None:
    """Delete this tag's generations that neither TAG.json nor TAG.prev.json names."""
    keep: set[str] = set()
    for name in (f"{tag}.json", f"{tag}.prev.json"):
        try:
            keep |= {e["file"] for e in json.loads((folder / name).read_text()).get("files", {}).values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    for path in folder.glob(f"{tag}-*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


@dataclass
class Checkpoint:
    path: Path  # the JSON file
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    swa: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # e.g. "preprocess": whitening basis
    fallback: str | None = None  # why the latest generation was skipped, when it was

    def __repr__(self) -> str:
        return f"Checkpoint({self.path}, epoch={self.meta.get('epoch')}, step={self.meta.get('step')})"


def _load_verified(folder: Path, entry: dict[str, str]) -> dict[str, torch.Tensor]:
    path = folder / entry["file"]
    if not path.is_file():
        raise VisrecError(f"checkpoint file {path} is missing", "the run folder is incomplete; use another checkpoint")
    if sha256_of(path) != entry["sha256"]:
        raise VisrecError(f"checkpoint file {path} is corrupt (its SHA-256 does not match the one recorded)",
                          "use another checkpoint (e.g. best instead of last)")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a file that hashes right but does not parse: report it the same way
        raise VisrecError(f"checkpoint file {path} cannot be read: {e}", "use another checkpoint") from None


def load_checkpoint(folder: Path, tag: str, *, with_state: bool = False) -> Checkpoint:
    """Read and verify checkpoint `tag`; `with_state` also loads the optimizer and RNG tensors.

    When the latest generation is missing, truncated or corrupt and the previous one is sound, the previous
    one is returned with `fallback` set to the reason (and a warning naming the bad file)."""
    try:
        return _load_one(folder / f"{tag}.json", with_state)
    except VisrecError as latest:
        prev = folder / f"{tag}.prev.json"
        if not prev.is_file():
            raise
        try:
            ckpt = _load_one(prev, with_state)
        except VisrecError as older:
            raise VisrecError(f"{latest.message}; the previous checkpoint is unusable too: {older.message}",
                              latest.hint) from None
        ckpt.fallback = latest.message
        warnings.warn(f"{latest.message}: using the previous checkpoint {prev} (step {ckpt.meta.get('step')})",
                      stacklevel=2)
        return ckpt


def _load_one(path: Path, with_state: bool) -> Checkpoint:
    folder = path.parent
    if not path.is_file():
        raise VisrecError(f"no checkpoint {path}", "has this run saved a checkpoint yet?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise VisrecError(f"checkpoint {path} is not valid JSON: {e}") from None
    files = meta.get("files", {})
    if "weights" not in files:
        raise VisrecError(f"checkpoint {path} names no weights file", "use another checkpoint")
    ckpt = Checkpoint(path, meta, _load_verified(folder, files["weights"]))
    if "ema" in files:
        ckpt.ema = _load_verified(folder, files["ema"])
    if "swa" in files:
        ckpt.swa = _load_verified(folder, files["swa"])
    for name, entry in files.items():
        if name not in _OWN_FILES:
            ckpt.extra[name] = _load_verified(folder, entry)
    if with_state:
        if "state" not in files:
            raise VisrecError(f"checkpoint {path} holds weights only and cannot resume training", "resume from last")
        tensors = _load_verified(folder, files["state"])
        ckpt.optimizer = _join_optimizer(tensors, meta["optimizer"])
        ckpt.rng = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return ckpt
