"""A device-resident batch iterator: one permutation per epoch, batches by index slicing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .augment import mirror
from .imageset import index_targets


class EpochOrder:
    """The order of each epoch of `self.images` (seeded by `self.seed` and the epoch, on the images' device) and the
    number of batches of `self.batch_size` in it: what in-memory and streamed batches share."""

    images: Any
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        n, device = len(self.images), self.images.device
        if not self.shuffle:
            return torch.arange(n, device=device)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(n, generator=g).to(device)


class DeviceBatches(EpochOrder):
    """Yields (uint8 images, targets) batches from tensors that already sit on the training device; targets are
    labels, or any tensor or dict of tensors with one row per image.

    The order of epoch `e` depends only on (seed, e), so an epoch can be resumed at any batch.
    With `drop_last`, a final partial batch is skipped (batch-norm dislikes tiny batches).

    Across processes (`rank` of `world`), `batch_size` stays the global batch: every rank walks the same epoch
    permutation and takes its contiguous share of each global batch, so the ranks together see each image of
    the epoch once, and the position (epoch, batch) means the same for any number of processes.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        alternate_flip: bool = False,
    ):
        self.images, self.targets = images, targets
        self.batch_size = min(batch_size, len(images))
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world = rank, world
        self.flip_start: torch.Tensor | None = None
        if alternate_flip:
            g = torch.Generator().manual_seed(self.seed * 100_003 + 7_919)
            self.flip_start = (torch.rand(len(images), generator=g) < 0.5).to(images.device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, Any]]:
        """The batches of `epoch`, from batch index `start` on."""
        perm = self.order(epoch)
        bs = self.batch_size
        for b in range(start, len(self)):
            idx = perm[b * bs : (b + 1) * bs]
            if self.world > 1:
                idx = idx.tensor_split(self.world)[self.rank]
            x, y = self.images[idx], index_targets(self.targets, idx)
            if self.flip_start is not None:
                x, y = mirror(x, y, self.flip_start[idx] ^ bool(epoch % 2))
            yield x, y
