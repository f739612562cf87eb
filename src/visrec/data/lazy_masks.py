"""Masks of a streamed COCO split, rasterized from the annotations when their rows are read: the instance map, the map
of shared pixels' other owners, or the class map, of any images, at the letterboxed size training reads them at.

A split of COCO train2017 at 640 px holds 118k instance maps of 400 KB each (48 GB): kept as polygons and RLEs
(a few hundred MB) and drawn per batch, they cost nothing until read. `select` keeps rows without drawing them (what
splitting a dataset does); indexing and `realize` draw them (what a batch, an evaluation or a figure does).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch


class Raster:
    """Draws image i's maps: its objects' segmentations at the annotation's (h, w), resized (nearest) to the image's
    part of the stored size, padded with 0 (no object) below and to the right."""

    def __init__(self, objects: list[list[Any]], sizes: list[tuple[int, int]], content: list[tuple[int, int]],
                 stored: tuple[int, int], labels: list[np.ndarray]):
        self.objects, self.sizes, self.content, self.stored, self.labels = objects, sizes, content, stored, labels

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one Raster per split, kept as long as the split
    def maps(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .coco import _mask

        h, w = self.sizes[i]
        inst, over = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
        for k, seg in enumerate(self.objects[i][:255], 1):
            m = _mask(seg, h, w)
            if m is not None:
                shared = m & (inst > 0)
                over[shared] = inst[shared]  # the earlier owner of a shared pixel moves to the second map
                inst[m] = k
        out = []
        ch, cw = self.content[i]
        for a in (inst, over):
            t = torch.from_numpy(a)
            if (ch, cw) != (h, w):
                t = torch.nn.functional.interpolate(t[None, None].float(), size=(ch, cw), mode="nearest")[0, 0]
            t = torch.nn.functional.pad(t, (0, self.stored[1] - cw, 0, self.stored[0] - ch))
            out.append(t.to(torch.uint8))
        return out[0], out[1]

    def semantic(self, i: int) -> torch.Tensor:
        inst = self.maps(i)[0].long()
        cls = torch.cat([torch.tensor([-1]), torch.from_numpy(np.asarray(self.labels[i], dtype=np.int64))])
        return (cls[inst.clamp_max(len(cls) - 1)] + 1).clamp_min(0).to(torch.uint8)


class LazyMasks:
    """Stands for a (N, H, W) uint8 tensor of one kind of map (`instances`, `overlaps` or `semantic`) of rows of a
    Raster; drawn when read."""

    dtype = torch.uint8

    def __init__(self, raster: Raster, which: str, rows: list[int] | None = None):
        self.raster, self.which = raster, which
        self.rows = list(range(len(raster.sizes))) if rows is None else rows

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.raster.stored))

    def __len__(self) -> int:
        return len(self.rows)

    def dim(self) -> int:
        return 3

    def select(self, index: torch.Tensor) -> LazyMasks:
        idx = index.nonzero().flatten() if index.dtype == torch.bool else index
        return LazyMasks(self.raster, self.which, [self.rows[i] for i in idx.tolist()])

    def kind(self, which: str) -> LazyMasks:
        return LazyMasks(self.raster, which, self.rows)

    def _draw(self, row: int) -> torch.Tensor:
        if self.which == "semantic":
            return self.raster.semantic(row)
        return self.raster.maps(row)[0 if self.which == "instances" else 1]

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, int | np.integer):
            return self._draw(self.rows[int(index)])
        if isinstance(index, slice):
            picked = self.rows[index]
        else:
            t = torch.as_tensor(index)
            picked = [self.rows[i] for i in (t.nonzero().flatten() if t.dtype == torch.bool else t.flatten()).tolist()]
        if not picked:
            return torch.zeros(0, *self.raster.stored, dtype=torch.uint8)
        return torch.stack([self._draw(r) for r in picked])

    def realize(self) -> torch.Tensor:
        return self[:]

    def split(self, size: int):
        for start in range(0, len(self.rows), size):
            yield self[start : start + size]

    def __repr__(self) -> str:
        return f"LazyMasks({self.which}, {len(self)} rows of {self.raster.stored})"
