"""Shared fixtures: small generated datasets in the real on-disk formats, and isolated folders."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test runs in its own folder, with its own cache and no $VISREC_DATA."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VISREC_DATA", raising=False)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_mnist_folder(folder: Path, n_train: int = 60, n_test: int = 20, compress: bool = True, seed: int = 0):
    """A tiny MNIST-format dataset; the label is encoded in the image's brightness so it is learnable."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = (rng.integers(0, 40, (n, 28, 28)) + y[:, None, None] * 20).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", x, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, compress)
        out[split] = (x, y)
    return out


def make_cifar_folder(folder: Path, n_per_batch: int = 10, variant: str = "cifar10", seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    if variant == "cifar10":
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            y = list(rng.integers(0, 10, n_per_batch))
            (folder / name).write_bytes(pickle.dumps({b"data": x, b"labels": [int(v) for v in y]}))
            arrays[name] = (x, y)
        meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    else:
        for name in ("train", "test"):
            x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            y = [int(v) for v in rng.integers(0, 100, n_per_batch)]
            (folder / name).write_bytes(pickle.dumps({b"data": x, b"fine_labels": y, b"coarse_labels": y}))
            arrays[name] = (x, y)
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    return arrays


def make_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 6, size=(12, 10), mode="RGB",
                      splits=("train",)) -> dict[str, list[Path]]:
    """PNG files, one subfolder per class; class k has mean brightness 40 + 80 k."""
    rng = np.random.default_rng(0)
    made: dict[str, list[Path]] = {}
    for split in splits:
        base = root / split if split else root
        for k, c in enumerate(classes):
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                a = np.clip(rng.normal(40 + 80 * k, 10, shape), 0, 255).astype(np.uint8)
                p = base / c / f"{i:03d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(a, mode).save(p)
                made.setdefault(split, []).append(p)
    return made


@pytest.fixture
def fmnist_dir() -> Path:
    """The real Fashion-MNIST files (installed by `make data`)."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        if os.environ.get("CI"):
            pytest.fail(f"Fashion-MNIST missing at {FMNIST_DIR}: `make test` runs `make data` first")
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST_DIR} (run `make data`)")
    return FMNIST_DIR
