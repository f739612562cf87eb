"""Atomic file writes: a file under its final name is always complete.

Every write goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the final name. A crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .errors import VisrecError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success, fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open() would: mkstemp's 0600 would hide it from a team
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `dest` to fill; on success it replaces `dest` whole (a folder appears complete or
    not at all), on an error it is removed and `dest` is left as it was."""
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def user_cache_dir() -> Path:
    """visrec's user cache: $XDG_CACHE_HOME/visrec or ~/.cache/visrec."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "visrec"


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def load_weights(path: str | os.PathLike, *, trust: bool = False) -> dict:
    """A state dict from a weight file: safetensors, or a PyTorch pickle (.pt/.pth/.bin) read with
    `weights_only=True`, which loads tensors and plain containers and refuses anything that would run code.

    Such a refused file loads only with `trust=True` (`--trust-checkpoint`): do that only for files from a
    source you trust, because unpickling them can execute arbitrary code. A dict holding the weights under
    "state_dict" or "model" (a common training-script layout) is unwrapped.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise VisrecError(f"weight file {path} does not exist", "give the path of a .safetensors or .pt file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged file: name it
            raise VisrecError(f"weight file {path} cannot be read as safetensors: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise VisrecError(
                f"weight file {path} holds Python objects beyond tensors, and loading it would run code from the "
                f"file ({str(e).splitlines()[0][:200]})",
                "convert it to safetensors where it came from, or, only if you trust its source, pass "
                "--trust-checkpoint",
            ) from None
        obj = torch.load(path, map_location="cpu", weights_only=False)  # trusted by the user's explicit choice
    except Exception as e:  # noqa: BLE001 - truncated or not a PyTorch file at all
        raise VisrecError(f"weight file {path} cannot be read: {type(e).__name__}: {e}",
                          "give a .safetensors file or a PyTorch state_dict saved with torch.save") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VisrecError(f"weight file {path} does not hold a state dict (name -> tensor)",
                          "save model.state_dict(), not the model object")
    return obj


def import_from_file(spec: str, kind: str, example: str) -> Any:
    """`path/to/file.py:name` -> that callable (a function or class) of the user's Python file. `kind` and
    `example` word the errors ("model", "--model path/to/file.py:function")."""
    import importlib.util
    import sys

    path_s, name = spec.rsplit(":", 1)
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise VisrecError(f"{kind} file {path} does not exist", f"give {example}")
    mod_name = f"visrec_user_{kind}_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error in the user's file is reported with its name
        raise VisrecError(f"{kind} file {path} failed to import: {type(e).__name__}: {e}") from None
    found = getattr(module, name, None)
    if not callable(found):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise VisrecError(f"{kind} file {path} has no {'function' if kind == 'model' else 'class'} {name!r}",
                          f"callables in it: {', '.join(names)}")
    return found
