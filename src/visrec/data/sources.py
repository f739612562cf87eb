"""Readers for the on-disk formats: IDX (MNIST family), CIFAR python batches, sklearn digits, synthetic.

Every reader returns uint8 (N, C, H, W) images and int64 labels, and names the file at fault when a
file is missing, truncated or not what it claims to be.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VisrecError
from .images import Fit, ImageFiles


@dataclass
class RawSplits:
    """What a reader found: the official train split, the official test split (or None), class names."""

    train_images: torch.Tensor | ImageFiles  # image folders: files decoded as each split is made
    train_labels: torch.Tensor
    test_images: torch.Tensor | ImageFiles | None
    test_labels: torch.Tensor | None
    classes: list[str]
    val_images: torch.Tensor | ImageFiles | None = None  # an official validation split (image folders with val/)
    val_labels: torch.Tensor | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad image files left out, with the reason
    train_targets: dict | None = None  # scenes: boxes, masks and captions per image (see ImageSet)
    test_targets: dict | None = None
    val_targets: dict | None = None
    category_ids: list[int] | None = None  # COCO/YOLO: the dataset's own id of each object class
    fit: Fit | None = None  # image folders: how each file becomes the model's input (recorded in runs)
    notes: list[str] = field(default_factory=list)  # what the user should know about how the data is read
    cache: str = "memory"  # image folders: how the images are held (data.cache, resolved)
    bad: Any = None  # streamed folders: the files left out as they are read (a stream.BadFiles)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: torch.uint8}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (gzip-compressed or raw) into a tensor of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise VisrecError(f"cannot read IDX file {path}: {e}", "the file is damaged; delete it and fetch it again") \
            from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise VisrecError(f"{path} is not an IDX file (bad magic number)", "expected MNIST-style IDX data")
    dtype = _IDX_TYPES.get(data[2])
    if dtype is None:
        raise VisrecError(f"{path}: IDX element type 0x{data[2]:02x} is not supported (only unsigned bytes, 0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise VisrecError(
            f"{path} is truncated or padded: header says {dims} ({expected} bytes), file has {len(data)} bytes",
            "delete it and fetch it again",
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=dtype).reshape(dims)


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def read_mnist_folder(folder: Path, classes: list[str]) -> RawSplits:
    found = {k: find_idx_file(folder, stem) for k, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in found.items() if p is None]
    if missing:
        raise VisrecError(f"{folder} lacks {', '.join(missing)} (.gz or raw)")
    arrays = {k: read_idx(p) for k, p in found.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise VisrecError(
                f"{found[f'{split}_images']} and {found[f'{split}_labels']} do not match: "
                f"images {tuple(x.shape)}, labels {tuple(y.shape)}"
            )
        if int(y.max()) >= len(classes):
            raise VisrecError(f"{found[f'{split}_labels']} has label {int(y.max())}, expected < {len(classes)}")
    return RawSplits(
        arrays["train_images"][:, None].contiguous(),
        arrays["train_labels"].long(),
        arrays["test_images"][:, None].contiguous(),
        arrays["test_labels"].long(),
        classes,
    )


# ---------------------------------------------------------------- CIFAR python batches


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches without running arbitrary code: only NumPy's array rebuilders pass."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR batch")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        raise VisrecError(f"{where} is not a valid CIFAR python batch: {e}", "delete it and fetch it again") from None
    if not isinstance(obj, dict):
        raise VisrecError(f"{where} is not a valid CIFAR python batch (expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
    },
}


def read_cifar(location: Path, variant: str) -> RawSplits:
    """`location` is the batches folder, a folder holding it, or the official .tar.gz archive."""
    lay = CIFAR_LAYOUT[variant]
    members: dict[str, bytes] = {}
    wanted = [*lay["train"], *lay["test"], lay["meta"]]
    if location.is_file():
        try:
            with tarfile.open(location, "r:gz") as tar:
                for m in tar.getmembers():
                    base = Path(m.name).name
                    if m.isfile() and base in wanted:
                        members[base] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise VisrecError(f"cannot read archive {location}: {e}", "delete it and fetch it again") from None
    else:
        folder = location / lay["folder"] if (location / lay["folder"]).is_dir() else location
        for name in wanted:
            if (folder / name).is_file():
                members[name] = (folder / name).read_bytes()
    missing = [w for w in wanted if w not in members]
    if missing:
        raise VisrecError(f"{location} lacks CIFAR files: {', '.join(missing)}")

    def load(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for n in names:
            b = _unpickle(members[n], f"{location}:{n}")
            data, labels = b.get("data"), b.get(lay["labels"])
            if data is None or labels is None:
                raise VisrecError(f"{location}:{n} lacks 'data' or '{lay['labels']}'")
            data = np.asarray(data, dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise VisrecError(f"{location}:{n} has data of shape {data.shape} for {len(labels)} labels")
            xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            ys.append(torch.as_tensor(list(labels), dtype=torch.int64))
        return torch.cat(xs), torch.cat(ys)

    meta = _unpickle(members[lay["meta"]], f"{location}:{lay['meta']}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[lay["names"]]]
    xtr, ytr = load(lay["train"])
    xte, yte = load(lay["test"])
    return RawSplits(xtr, ytr, xte, yte, classes)


# ---------------------------------------------------------------- scikit-learn digits


def read_digits() -> RawSplits:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16, scaled here to 0..255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return RawSplits(
        torch.from_numpy(x)[:, None].contiguous(),
        torch.from_numpy(d.target.astype(np.int64)),
        None,
        None,
        [str(i) for i in range(10)],
    )


# ---------------------------------------------------------------- synthetic


SYNTHETIC_DEFAULTS = {"classes": 10, "channels": 1, "size": 28, "train": 2000, "test": 500, "seed": 0, "noise": 0.25}


def parse_synthetic(spec: str) -> dict[str, float]:
    """`synthetic:classes=4,size=16` -> the synthetic dataset's parameters (defaults filled in)."""
    params = dict(SYNTHETIC_DEFAULTS)
    body = spec.split(":", 1)[1] if ":" in spec else ""
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise VisrecError(f"dataset {spec!r}: {part!r} is not key=value", "e.g. synthetic:classes=4,size=16")
        k, v = part.split("=", 1)
        if k not in params:
            raise VisrecError(f"dataset {spec!r}: unknown parameter {k!r}", f"valid: {', '.join(params)}")
        try:
            params[k] = float(v) if k == "noise" else int(v)
        except ValueError:
            raise VisrecError(f"dataset {spec!r}: {k}={v!r} is not a number") from None
    if params["classes"] < 2 or params["channels"] not in (1, 3) or params["size"] < 4:
        raise VisrecError(f"dataset {spec!r}: need classes >= 2, channels 1 or 3, size >= 4")
    return params


def make_synthetic(spec: str = "synthetic") -> RawSplits:
    """Procedural images: class k is a grating at angle +-90*k/(K-1) degrees (the sign drawn per image,
    so a mirror image stays in its class) with its own frequency and tint, a random phase, and pixel
    noise. Deterministic in the seed; learnable by a small CNN."""
    p = parse_synthetic(spec)
    k, c, s = int(p["classes"]), int(p["channels"]), int(p["size"])
    g = torch.Generator().manual_seed(int(p["seed"]))

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % k
        y = y[torch.randperm(n, generator=g)]
        sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        angle = sign * (math.pi / 2) * y.float() / (k - 1)
        freq = 2 * math.pi * (1.5 + (y % 3).float()) / s
        phase = torch.rand(n, generator=g) * 2 * math.pi
        coords = torch.arange(s, dtype=torch.float32)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
        wave = torch.sin(freq[:, None, None] * proj + phase[:, None, None])  # (n, s, s)
        tint = torch.stack([0.6 + 0.4 * torch.cos(2 * math.pi * (y.float() / k + j / 3)) for j in range(c)], 1)
        img = 0.5 + 0.4 * wave[:, None] * tint[:, :, None, None]
        img = img + p["noise"] * torch.randn(n, c, s, s, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), y

    xtr, ytr = make(int(p["train"]))
    xte, yte = make(int(p["test"]))
    return RawSplits(xtr, ytr, xte, yte, [f"class{i}" for i in range(k)])
