"""Images streamed from their files, for folders too large to decode into memory first (`data.cache=none`, or `auto`
when the decoded training set would not fit `data.memory_budget`).

Training reads them through `LoaderBatches`: PyTorch DataLoader worker processes open each file, draw a random-resized
crop from the original (timm's convention: a region of `crop_scale` of its area and `crop_ratio` aspect ratio, resized
to the model's size; JPEGs are decoded at the smallest reduction that keeps the region sharp) and prefetch whole batches
ahead of the step, in pinned memory for a GPU. The rest of visrec's augmentations (flips, crops with padding, colour,
mixing) then run on the batch on the device, as for images in memory. DataLoader rather than torchdata's nodes: it is
part of torch itself, its workers and pinning are what users' loops already use, and nothing here needs a graph of
nodes. Evaluation and everything else reads a `StreamedImages` as the uint8 tensor it stands for (`split`, slices and
index tensors decode in threads as they are read), with the run's evaluation transform (`Fit`: resize to cover,
centre crop of `data.crop_pct`).

Every draw depends only on (seed, epoch, image), never on which worker read it, so a resumed epoch sees the same
crops; every rank walks the same epoch order and takes its share of each global batch, so across processes each
image is read once per epoch. A file that cannot be read mid-stream is left out of its batch, named on stderr and in
summary.json (`skipped_files`); more than `data.max_bad_fraction` of a split's files bad stops the run with the list.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VisrecError
from .batches import EpochOrder
from .images import DEFAULT_RATIO, DEFAULT_SCALE, Fit, open_checked, random_crop_array, to_array
from .imageset import index_targets, move_targets


def default_workers() -> int:
    """DataLoader workers when data.workers=0: one per CPU core the process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class BadFiles:
    """The files left out mid-stream, with why; stops the run when more than `max_fraction` of `total` are bad."""

    def __init__(self, total: int, max_fraction: float, say: Callable[[str], None] | None = None):
        self.total, self.max_fraction, self.say = total, max_fraction, say
        self.found: dict[str, str] = {}

    def add(self, path: str, problem: str) -> None:
        if path in self.found:
            return
        self.found[path] = problem
        if self.say is not None:
            self.say(f"skipped {path}: {problem} ({len(self.found)} file(s) left out so far)")
        if len(self.found) > self.max_fraction * self.total:
            listed = "; ".join(f"{p} ({why})" for p, why in list(self.found.items())[:5])
            raise VisrecError(f"{len(self.found)} of {self.total:,} image files could not be read, more than "
                              f"data.max_bad_fraction={self.max_fraction:g}: {listed}",
                              "run `visrec validate DATA` to list every bad file, remove or replace them, or raise "
                              "data.max_bad_fraction")

    def rows(self) -> list[dict[str, str]]:
        return [{"path": p, "problem": why} for p, why in self.found.items()]


class StreamedImages:
    """The images of a split left in their files, standing for the uint8 (N, C, H, W) tensor they decode to under
    `fit`: `len`, `shape`, `split(n)`, slices and index tensors work as on that tensor, each read decoding its images
    in threads. A file that cannot be read decodes as a grey image and is recorded in `bad` (when given)."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, paths: list[Path], channels: int, fit: Fit, max_pixels: int | None = None,
                 bad: BadFiles | None = None):
        self.paths, self.channels, self.fit, self.max_pixels = list(paths), channels, fit, max_pixels
        self.bad = bad

    # ---- the tensor it stands for
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), self.channels, self.fit.height, self.fit.width))

    def dim(self) -> int:
        return 4

    ndim = property(dim)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return len(self.paths)

    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> StreamedImages | torch.Tensor:
        """Itself on the CPU (it is read batch by batch); elsewhere, the decoded tensor."""
        if device is None or torch.device(device).type == "cpu":
            return self
        return self[:].to(device, *args, **kwargs)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, int | np.integer):
            return self._decode([int(index)])[0]
        if isinstance(index, slice):
            rows = list(range(len(self.paths)))[index]
        else:
            t = torch.as_tensor(index)
            rows = (t.nonzero().flatten() if t.dtype == torch.bool else t.flatten()).tolist()
        return self._decode(rows)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Chunks of `size` images in order, the next one decoding while the caller works on this one."""
        starts = range(0, len(self.paths), size)
        if not starts:
            return
        with ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(self._decode, range(0, min(size, len(self.paths))))
            for start in starts:
                chunk = pending.result()
                nxt = start + size
                if nxt < len(self.paths):
                    pending = ahead.submit(self._decode, range(nxt, min(nxt + size, len(self.paths))))
                yield chunk

    def _decode(self, rows) -> torch.Tensor:
        rows = list(rows)
        out = torch.empty(len(rows), self.channels, self.fit.height, self.fit.width, dtype=torch.uint8)

        def fill(k: int) -> None:
            path = self.paths[rows[k]]
            try:
                with open_checked(path, self.max_pixels) as im:
                    a = to_array(im, self.channels, self.fit)
                out[k] = torch.from_numpy(a).permute(2, 0, 1)
            except (VisrecError, OSError, ValueError) as e:
                out[k] = 128
                if self.bad is None:
                    raise VisrecError(f"cannot decode image {path}: {_why(e)}", "remove or replace the file") from None
                self.bad.add(str(path), _why(e))

        with ThreadPoolExecutor(min(8, max(1, len(rows)), 2 * (os.cpu_count() or 1))) as pool:
            list(pool.map(fill, range(len(rows))))  # Pillow decodes without the GIL
        return out

    # ---- what it is
    def select(self, index: torch.Tensor | None) -> StreamedImages:
        """The files at `index` (int positions or a bool mask), still not decoded."""
        if index is None:
            return self
        idx = index.nonzero().flatten() if index.dtype == torch.bool else index
        return StreamedImages([self.paths[i] for i in idx.tolist()], self.channels, self.fit, self.max_pixels,
                              self.bad)

    def fingerprint(self) -> str:
        """A digest of the files (paths, sizes, modification times) and the transform: what a cache of anything
        computed from these images is keyed by."""
        def stamp(p) -> tuple:
            if not isinstance(p, Path | str):  # a sample inside a shard: where it is
                return (str(p), p.offset, p.size)
            st = os.stat(p)
            return (str(p), st.st_size, st.st_mtime_ns)

        stats = [stamp(p) for p in self.paths]
        return hashlib.sha256(json.dumps([stats, self.channels, self.fit.state()]).encode()).hexdigest()[:32]

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """A seeded random `n` of the images, decoded (what statistics are fitted on)."""
        if n >= len(self):
            return self[:]
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return self[idx]

    def __repr__(self) -> str:
        return f"StreamedImages({len(self):,} files, {self.channels}x{self.fit.height}x{self.fit.width})"


def _why(e: BaseException) -> str:
    text = e.message if isinstance(e, VisrecError) else f"{type(e).__name__}: {e}"
    return text.splitlines()[0][:300]


class _Files(torch.utils.data.Dataset):
    """What a worker process does with one key (epoch, image): open, crop at random (training) or fit (evaluation),
    decode; a bad file comes back as its problem, never an exception."""

    def __init__(self, images: StreamedImages, train: bool, seed: int, scale, ratio):
        self.images, self.train, self.seed, self.scale, self.ratio = images, train, seed, scale, ratio

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, torch.Tensor | str]:
        epoch, i = key
        im_set = self.images
        path = im_set.paths[i]
        try:
            with open_checked(path, im_set.max_pixels) as im:
                if self.train:  # the crop depends on (seed, epoch, image) only: any worker draws the same
                    a = random_crop_array(im, im_set.channels, im_set.fit,
                                          np.random.default_rng([self.seed, epoch, i]), self.scale, self.ratio)
                else:
                    a = to_array(im, im_set.channels, im_set.fit)
            return i, torch.from_numpy(a).permute(2, 0, 1)
        except (VisrecError, OSError, ValueError, SyntaxError) as e:
            return i, _why(e)


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    bad = [(i, x) for i, x in items if isinstance(x, str)]
    x = torch.stack([t for _, t in good]) if good else torch.empty(0, dtype=torch.uint8)
    return x, torch.tensor([i for i, _ in good], dtype=torch.int64), bad


class _EpochOrder(torch.utils.data.Sampler):
    """The keys of each batch of one epoch (from batch `start`), this rank's share of each global batch."""

    def __init__(self, batches: LoaderBatches):
        self.b = batches
        self.epoch, self.start = 0, 0

    def __iter__(self):
        b = self.b
        perm = b.order(self.epoch).tolist()
        bs = b.batch_size
        for k in range(self.start, len(b)):
            idx = perm[k * bs : (k + 1) * bs]
            if b.world > 1:
                idx = [int(t) for t in torch.tensor(idx).tensor_split(b.world)[b.rank]]
            yield [(self.epoch, i) for i in idx]

    def __len__(self) -> int:
        return len(self.b) - self.start


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # a worker decodes; the step's threads are the main process's


class Delivery:
    """How streamed batches reach the step: the bad samples of each recorded, the targets indexed and moved, the
    images moved (asynchronously to a GPU from pinned memory); a batch whose samples were all bad repeats the one
    before it, so that an epoch's step count never changes."""

    images: StreamedImages
    targets: Any
    device: torch.device
    bad: BadFiles
    read: int
    _last: tuple[torch.Tensor, Any] | None

    def _deliver(self, feed, epoch: int) -> Iterator[tuple[torch.Tensor, Any]]:
        for x, idx, bad in feed:
            self.read += len(idx) + len(bad)
            for i, problem in bad:
                self.bad.add(str(self.images.paths[i]), problem)
            if len(idx) == 0:
                if self._last is None:
                    raise VisrecError(f"every image of the first batch of epoch {epoch + 1} could not be read",
                                      "run `visrec validate DATA` to find the bad files (shards: pack them again)")
                yield self._last
                continue
            y = move_targets(index_targets(self.targets, idx), self.device)
            self._last = (x.to(self.device, non_blocking=self.device.type == "cuda"), y)
            yield self._last


class LoaderBatches(EpochOrder, Delivery):
    """Training batches streamed from files by DataLoader workers: (uint8 images, targets) on `device`, in the same
    order and with the same resumable positions as `DeviceBatches` (see that class for `rank`, `world`, `drop_last`).
    `bad` collects the files left out. `random_crops` False reads each image whole, fitted as for evaluation (images
    whose targets are in their pixels)."""

    def __init__(self, images: StreamedImages, targets: Any, batch_size: int, *, device: torch.device,
                 seed: int = 0, rank: int = 0, world: int = 1, workers: int = 0, shuffle: bool = True,
                 drop_last: bool = True, scale: tuple[float, float] = DEFAULT_SCALE,
                 ratio: tuple[float, float] = DEFAULT_RATIO, bad: BadFiles | None = None, prefetch: int = 4,
                 random_crops: bool = True):
        self.images, self.targets, self.device = images, targets, torch.device(device)
        self.batch_size = min(batch_size, len(images))
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle, self.drop_last = shuffle, drop_last
        self.workers = workers or default_workers()
        self.bad = bad if bad is not None else BadFiles(len(images), 1.0)
        self.sampler = _EpochOrder(self)
        self.loader = torch.utils.data.DataLoader(
            _Files(images, random_crops, seed, tuple(scale), tuple(ratio)), batch_sampler=self.sampler,
            num_workers=self.workers, collate_fn=_collate, pin_memory=self.device.type == "cuda",
            persistent_workers=self.workers > 0, prefetch_factor=prefetch if self.workers > 0 else None,
            worker_init_fn=_init_worker, generator=torch.Generator().manual_seed(seed))
        self._last: tuple[torch.Tensor, Any] | None = None
        self.read = 0  # samples this process has read (good or bad), over every epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, Any]]:
        """The batches of `epoch`, from batch index `start` on; a batch whose files were all bad repeats the one
        before it (the step count of an epoch never changes)."""
        self.sampler.epoch, self.sampler.start = epoch, start
        yield from self._deliver(self.loader, epoch)

    def close(self) -> None:
        """Stop the worker processes now (they also stop when this object is collected)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
