"""Image-folder datasets: one subfolder per class, optionally under train/, val/ and test/; or a flat folder of images
(one class, for tasks that learn from images alone, such as style)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import VisrecError
from .images import MAX_PIXELS, ImageFiles, load_images, native_channels, peek, scan_classes
from .sources import RawSplits

AUTO_DISK_BYTES = 64 << 20  # data.cache=auto: decoded images of this size or more are cached on disk


def read_image_folder(root: Path, image_size: int | None = None, channels: int | None = None,
                      skip_bad: bool = False, max_pixels: int | None = None, cache: str = "auto") -> RawSplits:
    """Read `root/<class>/*` or `root/{train,val,test}/<class>/*`: labels now, images as `ImageFiles` that each split
    decodes when it is made (into memory, or once into the decoded cache on disk: `cache`, see data.cache).

    Class names are the train folder's subfolder names in sorted order; val/ and test/ must use the
    same names (a subset is fine), so labels are matched by name, never by position. A bad file stops
    loading with its path, unless `skip_bad`: then every file is decoded once first, and the bad ones are
    left out and listed in the result's `skipped`.
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
    if channels is None:
        channels = 3 if any(native_channels(peek(p, max_pixels)[0]) == 3 for p in all_files) else 1
    if image_size is None:
        size0 = peek(all_files[0], max_pixels)[1]
        odd = [p for p in all_files if peek(p, max_pixels)[1] != size0]
        if odd:
            # load_images lists the files; run it on everything so the message covers all splits.
            load_images(all_files, channels, None, max_pixels=max_pixels)
    w, h = (image_size, image_size) if image_size else peek(all_files[0], max_pixels)[1]
    if cache == "auto":
        cache = "disk" if len(all_files) * channels * h * w >= AUTO_DISK_BYTES else "memory"

    def read(split: str) -> tuple[ImageFiles, torch.Tensor]:
        found, _ = scanned[split]
        paths, labels = [], []
        for name, files in found.items():
            paths += files
            labels += [classes.index(name)] * len(files)
        return ImageFiles(paths, channels, image_size, max_pixels, cache), torch.tensor(labels, dtype=torch.int64)

    xtr, ytr = read("train")
    out = RawSplits(xtr, ytr, None, None, classes, skipped=skipped)
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
