"""ImageSet: a labelled set of images as one uint8 tensor, and seeded stratified splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def index_targets(targets: Any, idx: torch.Tensor) -> Any:
    """The targets of the images at `idx`: a tensor, a list (captions), or a dict of them, each indexed."""
    if isinstance(targets, dict):
        return {k: index_targets(v, idx) for k, v in targets.items()}
    if isinstance(targets, list):
        return [targets[i] for i in idx.tolist()]
    if not isinstance(targets, torch.Tensor) and hasattr(targets, "select"):  # drawn when read (LazyMasks): kept
        return targets.select(idx)
    return targets[idx]


def move_targets(targets: Any, device: torch.device | str) -> Any:
    """Targets on `device`: tensors moved, a dict's tensors moved, anything else (captions) as it is."""
    if isinstance(targets, dict):
        return {k: move_targets(v, device) for k, v in targets.items()}
    if hasattr(targets, "realize"):  # drawn when read (LazyMasks): drawn now
        targets = targets.realize()
    return targets.to(device) if isinstance(targets, torch.Tensor) else targets


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), and the class names the labels index.

    Scenes carry more targets, one row per image, in `targets` (see `visrec.data.targets`): `boxes` (N, M, 4)
    float xyxy pixels and `box_labels` (N, M) int64 (-1 pads images with fewer than M objects), `instances`
    (N, H, W) uint8 (0 = no object, k = the k-th box), and `captions` (a list of lists of strings). For them,
    `labels` is the class of each image's largest object."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    targets: dict[str, Any] | None = None
    # the dataset's own id of each object class (COCO category ids, YOLO class indices), for results files that
    # its own tools score; None: class k is category k + 1
    category_ids: list[int] | None = None

    def __post_init__(self) -> None:
        # images may also be a StreamedImages (files read batch by batch), which stands for such a tensor
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            got = f"{self.images.dtype} {tuple(self.images.shape)}"
            raise ValueError(f"ImageSet images must be uint8 (N, C, H, W), got {got}")
        if self.labels.shape != (self.images.shape[0],):
            n, shape = self.images.shape[0], tuple(self.labels.shape)
            raise ValueError(f"ImageSet has {n} images but labels of shape {shape}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    @property
    def streamed(self) -> bool:
        """Whether the images stay in their files (a StreamedImages), read batch by batch."""
        return not isinstance(self.images, torch.Tensor)

    def subset(self, index: torch.Tensor) -> ImageSet:
        t = index_targets(self.targets, index) if self.targets is not None else None
        images = self.images.select(index) if self.streamed else self.images[index]
        return ImageSet(images, self.labels[index], self.classes, self.name, t, self.category_ids)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes, self.name,
                        move_targets(self.targets, device), self.category_ids)

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return f"ImageSet({self.name!r}, n={len(self)}, shape={c}x{h}x{w}, classes={self.num_classes})"


@dataclass
class Dataset:
    """The splits of one dataset: train, val (held out from train) and test (kept apart until the end)."""

    name: str
    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    source: str = ""  # where the files were read from
    splits: dict[str, Any] = field(default_factory=dict)  # how val and test were made (recorded in runs)
    fit: Any = None  # image folders: how a file becomes the model's input (an images.Fit, recorded in runs)
    notes: list[str] = field(default_factory=list)  # what the user should know about how the data is read
    bad: Any = None  # streamed images: the files left out as they were read (a stream.BadFiles)

    @property
    def streamed(self) -> bool:
        """Whether the training images stay in their files, read batch by batch by worker processes."""
        return self.train.streamed

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def channels(self) -> int:
        return self.train.channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.image_size

    def split(self, name: str) -> ImageSet:
        s = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if s is None:
            raise KeyError(f"dataset {self.name!r} has no {name!r} split")
        return s

    def __repr__(self) -> str:
        c, (h, w) = self.channels, self.image_size
        nval = len(self.val) if self.val is not None else 0
        return (
            f"Dataset({self.name!r}, train={len(self.train)}, val={nval}, test={len(self.test)}, "
            f"shape={c}x{h}x{w}, classes={self.num_classes})"
        )


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held out) with `fraction` of every class held out.

    Each class keeps at least one example and, when fraction > 0 and it has two or more, gives at
    least one. Deterministic in `seed`; both index tensors are sorted.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    labels = labels.cpu()
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of about `n` examples with the class proportions of `labels`."""
    if n >= len(labels):
        return torch.arange(len(labels))
    _, held = stratified_split(labels, n / len(labels), seed)
    return held
