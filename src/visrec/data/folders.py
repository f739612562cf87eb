"""Image-folder datasets: one subfolder per class, optionally under train/, val/ and test/; or a flat folder of images
(one class, for tasks that learn from images alone, such as style)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import parse_size
from ..errors import VisrecError
from .images import MAX_PIXELS, Fit, ImageFiles, native_channels, peek, scan_classes
from .sources import RawSplits

AUTO_DISK_BYTES = 64 << 20  # data.cache=auto: decoded images of this size or more are cached on disk
AUTO_SIZE_MAX = 224  # several image sizes, no data.image_size: the median shorter side, at most this
SIZE_SAMPLE = 256  # files whose headers decide the size of a folder without data.image_size
STREAM_CROP_PCT = 0.875  # data.crop_pct by default when training streams random-resized crops (timm's)


def memory_budget_bytes(budget: str | int | None) -> int:
    """data.memory_budget in bytes: a number of bytes, "512MB", "4GB", or auto (an eighth of this machine's memory)."""
    if budget in (None, "", "auto"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 << 30
        return total // 8
    return parse_size(budget, "data.memory_budget")


def choose_size(sizes: list[tuple[int, int]], notes: list[str]) -> tuple[int, int]:
    """(height, width) for images of these (width, height) sizes without data.image_size: theirs when they agree,
    else the median shorter side (at most AUTO_SIZE_MAX), square, said in `notes`."""
    if len(set(sizes)) == 1:
        return sizes[0][1], sizes[0][0]
    shorter = sorted(min(s) for s in sizes)
    side = max(1, min(AUTO_SIZE_MAX, shorter[len(shorter) // 2]))
    lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    notes.append(f"images of several sizes (from {lo[0]}x{lo[1]} to {hi[0]}x{hi[1]}): each is resized to cover "
                 f"{side}x{side} and centre-cropped, keeping its aspect ratio (set data.image_size to choose)")
    return side, side


def _human(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def read_image_folder(root: Path, image_size: int | None = None, channels: int | None = None,
                      skip_bad: bool = False, max_pixels: int | None = None, cache: str = "auto",
                      memory_budget: str | int | None = "auto", crop_pct: float | None = None,
                      max_bad_fraction: float = 0.01) -> RawSplits:
    """Read `root/<class>/*` or `root/{train,val,test}/<class>/*`: labels now, images as `ImageFiles` that each split
    decodes when it is made (into memory, or once into the decoded cache on disk: `cache`, see data.cache).

    Class names are the train folder's subfolder names in sorted order; val/ and test/ must use the
    same names (a subset is fine), so labels are matched by name, never by position. A bad file stops
    loading with its path, unless `skip_bad`: then every file is decoded once first, and the bad ones are
    left out and listed in the result's `skipped`.

    Every image is fitted to one size (`Fit`: resized to cover it, centre crop; `crop_pct` of it): `image_size`
    square, or without it the files' own size when the headers of a sample of them agree, else the median shorter
    side (at most AUTO_SIZE_MAX). `cache` auto keeps small sets in memory, caches those within `memory_budget` on
    disk, and streams larger ones from their files (none; see visrec.data.stream).
    """
    if not root.is_dir():
        raise VisrecError(f"image folder {root} does not exist", "give folder:PATH with one subfolder per class")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise VisrecError(f"{root} has {', '.join(split_dirs)}/ but no train/ folder", "add train/<class>/ folders")
    layout = split_dirs if split_dirs else {"train": root}

    scanned = {s: _scan(d) for s, d in layout.items()}
    skipped = _drop_bad_files(scanned, max_pixels) if skip_bad else []
    classes = list(scanned["train"][0])
    # one class (a flat folder of images, or a single class folder) is data for generative models and style; the
    # classification task refuses it, with its own message
    if not classes:
        raise VisrecError(f"{layout['train']} holds no images and no class folders",
                          "put each class's images in its own subfolder (or, for generative models and style, the "
                          "images themselves)")
    for split, (found, _) in scanned.items():
        for name, files in found.items():
            if not files:
                raise VisrecError(f"class folder {layout[split] / name} has no images", "add images or remove it")
            if name not in classes:
                raise VisrecError(
                    f"{layout[split] / name}: class {name!r} does not exist in {layout['train']}",
                    f"{split}/ may only use the train classes: {', '.join(classes)}",
                )

    # One channel count for every split, decided from all files so val/test match train.
    all_files = [p for found, _ in scanned.values() for files in found.values() for p in files]
    def header(path: Path) -> tuple[str, tuple[int, int]] | None:
        """A file's (mode, size); None for a file that cannot be read: its error comes where it is decoded (or, when
        the images stream, it is left out and counted)."""
        try:
            return peek(path, max_pixels)
        except VisrecError:
            return None

    if channels is None:
        channels = 3 if any((m := header(p)) and native_channels(m[0]) == 3 for p in all_files) else 1
    notes: list[str] = []
    if image_size:
        h = w = image_size
    else:
        step = max(1, len(all_files) // SIZE_SAMPLE)
        sizes = [m[1] for p in all_files[::step][:SIZE_SAMPLE] if (m := header(p))]
        if not sizes:
            peek(all_files[0], max_pixels)  # not one readable: the first one's error
        h, w = choose_size(sizes, notes)
    decoded = len(all_files) * channels * h * w
    budget = memory_budget_bytes(memory_budget)
    mode = cache
    if cache == "auto":
        mode = "none" if decoded > budget else "memory" if decoded < AUTO_DISK_BYTES else "disk"
        if mode == "none":
            notes.append(f"streaming {len(all_files):,} images from their files: decoded at {w}x{h} they would take "
                         f"{_human(decoded)}, above data.memory_budget ({_human(budget)}); set data.cache=disk to "
                         "decode them once into the cache on disk instead")
    if crop_pct is None:
        crop_pct = STREAM_CROP_PCT if mode == "none" else 1.0
    fit = Fit(h, w, crop_pct)
    bad = None
    if mode == "none":
        from .stream import BadFiles, say

        bad = BadFiles(len(all_files), max_bad_fraction, say)

    def read(split: str) -> tuple[ImageFiles, torch.Tensor]:
        found, _ = scanned[split]
        paths, labels = [], []
        for name, files in found.items():
            paths += files
            labels += [classes.index(name)] * len(files)
        return ImageFiles(paths, channels, fit, max_pixels, mode, bad), torch.tensor(labels, dtype=torch.int64)

    xtr, ytr = read("train")
    out = RawSplits(xtr, ytr, None, None, classes, skipped=skipped, fit=fit, notes=notes, cache=mode, bad=bad)
    if "test" in scanned:
        out.test_images, out.test_labels = read("test")
    if "val" in scanned:
        out.val_images, out.val_labels = read("val")
    return out


UNLABELED = "(images)"


def _scan(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """`scan_classes`, or for a folder of image files without class subfolders, all its images as one class."""
    classes, ignored = scan_classes(folder)
    if not classes:
        from .images import is_image_file

        files = sorted(p for p in folder.iterdir() if p.is_file())
        images = [p for p in files if is_image_file(p)]
        if images:
            return {UNLABELED: images}, [p for p in files if not is_image_file(p)]
    return classes, ignored


def _drop_bad_files(scanned: dict[str, tuple[dict[str, list[Path]], list[Path]]],
                    max_pixels: int | None) -> list[dict[str, str]]:
    """Decode every file once; remove the bad ones from `scanned` in place and return them with the reason."""
    from concurrent.futures import ThreadPoolExecutor

    from .validate import check_image

    files = [p for found, _ in scanned.values() for paths in found.values() for p in paths]
    with ThreadPoolExecutor(8) as pool:  # Pillow decodes without the GIL
        verdicts = dict(zip(files, pool.map(lambda p: check_image(p, max_pixels or MAX_PIXELS), files), strict=True))
    skipped = [{"path": str(p), "problem": f"{v[0]}: {v[1]}"} for p, v in verdicts.items() if v]
    for found, _ in scanned.values():
        for name in found:
            found[name] = [p for p in found[name] if not verdicts[p]]
    return skipped
