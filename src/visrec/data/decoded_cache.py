"""The decoded cache of image folders (`data.cache=disk`): a split's files are decoded once, at the run's channels and
size, into one uint8 (N, C, H, W) .npy file in the user cache, and every later run memory-maps it, so it starts without
decoding, and a set larger than memory trains through the operating system's page cache.

An entry is named by a digest of what its pixels depend on: each file's resolved path, byte size and modification
time, the channels, the size and the decoder's version. A changed, added or removed file names another entry, so a
stale one is never read; it is rebuilt, and the entries of the same files at the same settings that it replaces are
removed. Each entry is checked on opening (its description and its byte count), and written atomically: a run
stopped while writing leaves nothing under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import VisrecError
from ..io import atomic_path, user_cache_dir, write_json
from .images import Fit, check_headers, decode_into

VERSION = 1  # of what a file decodes to: raise it when decoding changes, and every entry is rebuilt


def cache_folder() -> Path:
    return user_cache_dir() / "decoded"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()[:32]


def entry_names(paths: list[Path], channels: int, size: int | Fit | None) -> tuple[str, str]:
    """(the entry's name: files, their sizes and times, the settings; the family it replaces: files and settings)."""
    files = [str(Path(p).resolve()) for p in paths]
    stats = [os.stat(p) for p in files]
    family = _digest([VERSION, channels, size.state() if isinstance(size, Fit) else size, files])
    return _digest([family, [(s.st_size, s.st_mtime_ns) for s in stats]]), family


def cached_images(paths: list[Path], channels: int, size: int | Fit | None,
                  max_pixels: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) of the files, memory-mapped from the cache (copy-on-write: a change stays in this process);
    decoded into the cache first when no valid entry exists."""
    name, family = entry_names(paths, channels, size)
    folder = cache_folder()
    data, meta = folder / f"{name}.npy", folder / f"{name}.json"
    shape = _valid(data, meta, len(paths))
    if shape is None:
        channels, (h, w) = check_headers(paths, channels, size, max_pixels)
        shape = (len(paths), channels, h, w)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(data) as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                decode_into(torch.from_numpy(out), paths, channels, size)
                out.flush()
                del out
            write_json(meta, {"version": VERSION, "family": family, "shape": list(shape), "files": len(paths),
                              "first": str(paths[0]), "last": str(paths[-1])})
        except OSError as e:  # a full or read-only disk: say where, and how to go on
            raise VisrecError(f"cannot write the decoded cache of {len(paths):,} images ({np.prod(shape) / 1e9:.2f} "
                              f"GB) in {folder}: {e}", "free space there, point $XDG_CACHE_HOME at another disk, or "
                              "decode into memory on every run: --set data.cache=memory") from None
        _drop_replaced(folder, family, keep=name)
    array = np.load(data, mmap_mode="c")
    return torch.from_numpy(array)


def _valid(data: Path, meta: Path, n: int) -> tuple[int, ...] | None:
    """The entry's shape when both its files are there and agree, else None (it is rebuilt)."""
    try:
        info = json.loads(meta.read_text())
        shape = tuple(info["shape"])
        header = np.load(data, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("version") != VERSION or shape[0] != n or header.shape != shape or header.dtype != np.uint8:
        return None
    return shape


def _drop_replaced(folder: Path, family: str, keep: str) -> None:
    """Remove the entries of the same files and settings whose files have since changed."""
    for meta in folder.glob("*.json"):
        if meta.stem == keep:
            continue
        try:
            same = json.loads(meta.read_text()).get("family") == family
        except (OSError, ValueError):
            continue
        if same:
            (folder / f"{meta.stem}.npy").unlink(missing_ok=True)
            meta.unlink(missing_ok=True)


def cache_entries() -> list[dict]:
    """Every entry of the decoded cache: its name, shape, bytes on disk, file count, first and last file, and
    whether those files are still there (a folder deleted or moved leaves its entries behind)."""
    rows = []
    for meta in sorted(cache_folder().glob("*.json")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        data = meta.with_suffix(".npy")
        rows.append({"name": meta.stem, "shape": info.get("shape"), "files": info.get("files"),
                     "first": info.get("first"), "last": info.get("last"),
                     "bytes": data.stat().st_size if data.is_file() else 0,
                     "files_present": bool(info.get("first")) and Path(info["first"]).is_file()})
    return rows


def clear_cache(only_orphans: bool = False) -> tuple[int, int]:
    """Remove the decoded cache's entries (`only_orphans`: those whose files are gone); (entries, bytes) freed. An
    entry being written (a temporary file) is left alone."""
    n = freed = 0
    for row in cache_entries():
        if only_orphans and row["files_present"]:
            continue
        for suffix in (".npy", ".json"):
            (cache_folder() / f"{row['name']}{suffix}").unlink(missing_ok=True)
        n, freed = n + 1, freed + row["bytes"]
    return n, freed
