"""`visrec validate`: scan an image-folder dataset before training and report every problem at once.

Errors are what would stop training: files that are empty, unreadable or truncated, images above the
pixel limit (decompression bombs, caught from the header before any decoding), empty class folders, val/test
classes missing from train. Warnings are what would train but mislead: fewer than two classes (what generative
models and style take, and a classifier refuses), the same file in two splits (a leak into the evaluation), class
names whose sorted order is not their numeric order (`1, 10, 2`: labels by position would be off), image modes
visrec has no documented conversion for. Notes: hidden folders and non-image files that are ignored. Images of
several sizes are a note (training fits them to one size, keeping their aspect ratio); in COCO and YOLO data an error
without an image size (training refuses them), a note with one (they are resized).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import VisrecError
from .images import is_image_file

KNOWN_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "I", "I;16", "I;16B",
               "I;16L", "I;16N", "F", "La"}
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb limit


@dataclass
class Problem:
    severity: str  # error | warning | note
    kind: str
    path: str
    detail: str


@dataclass
class Report:
    root: str
    files: int = 0
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> image count
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def add(self, severity: str, kind: str, path: Path | str, detail: str) -> None:
        self.problems.append(Problem(severity, kind, str(path), detail))

    def to_json(self) -> dict:
        return {"root": self.root, "ok": self.ok, "files": self.files, "classes": self.classes,
                "problems": [vars(p) for p in self.problems]}


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one image file, or None when it decodes fully."""
    if path.stat().st_size == 0:
        return "empty", "the file has zero bytes"
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                return "bomb", (f"{w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} (checked from the "
                                f"header, not decoded); raise data.max_pixels if the image is genuine")
            im.load()  # the whole decode: catches truncated files
    except UnidentifiedImageError:
        return "unreadable", "not an image format Pillow can read"
    except (OSError, ValueError, SyntaxError) as e:
        return "truncated", f"decoding failed: {e}"
    except Image.DecompressionBombError as e:
        return "bomb", str(e)
    return None


def _numeric_order_differs(names: list[str]) -> bool:
    nums = [n for n in names if re.fullmatch(r"\d+", n)]
    return len(nums) > 1 and sorted(nums) != sorted(nums, key=int)


def mixed_sizes(report: Report, where: Path | str, sizes: dict[tuple[int, int], int], image_size: int | None,
                fitted: bool = False) -> None:
    """Images of several (width, height) sizes: training refuses them unless data.image_size resizes them; `fitted`
    (image folders): training fits them to one size itself (a note that says which)."""
    if len(sizes) < 2:
        return
    common = max(sizes, key=sizes.get)
    if sizes[common] > 1:
        which = f"most often {common[0]}x{common[1]}, {sizes[common]} images"
    else:
        small, large = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        which = f"no two alike, from {small[0]}x{small[1]} to {large[0]}x{large[1]}"
    if image_size is None and fitted:
        from .folders import AUTO_SIZE_MAX

        shorter = sorted(min(wh) for wh, n in sizes.items() for _ in range(n))
        side = max(1, min(AUTO_SIZE_MAX, shorter[len(shorter) // 2]))
        report.add("note", "mixed-sizes", where, f"{len(sizes)} image sizes ({which}): training resizes each to cover "
                   f"{side}x{side} (the median shorter side, at most {AUTO_SIZE_MAX}) and crops its centre, keeping "
                   "its aspect ratio; choose the size with --set data.image_size=N")
    elif image_size is None:
        report.add("error", "mixed-sizes", where, f"{len(sizes)} image sizes ({which}): training refuses them; "
                   "resize them in training with --set data.image_size=N (validate --image-size N checks that)")
    else:
        report.add("note", "mixed-sizes", where, f"{len(sizes)} image sizes ({which}); training resizes them to "
                   f"{image_size}x{image_size}")


def validate_folder(root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, image_size: int | None = None) -> Report:
    """Scan `root/<class>/*` or `root/{train,val,test}/<class>/*` and report every problem found; `image_size` is
    the data.image_size training will use (None: images must share one size)."""
    root = Path(str(root).removeprefix("folder:")).expanduser()
    if not root.is_dir():
        raise VisrecError(f"{root} is not a folder", "give the folder that holds one subfolder per class")
    report = Report(str(root))
    splits = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    layout = splits or {"train": root}
    if splits and "train" not in splits:
        report.add("error", "no-train", root, f"has {', '.join(splits)}/ but no train/ folder")
    hashes: dict[str, set[str]] = defaultdict(set)
    first_path: dict[str, Path] = {}
    sizes: dict[tuple[int, int], int] = defaultdict(int)
    for split, folder in layout.items():
        counts: dict[str, int] = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if sub.name.startswith("."):
                report.add("note", "hidden-folder", sub, "hidden folder: ignored")
                continue
            files = sorted(p for p in sub.rglob("*") if p.is_file())
            images = [p for p in files if is_image_file(p)]
            for p in files:
                if p not in images:
                    report.add("note", "not-an-image", p, "not an image file (by extension): ignored")
            counts[sub.name] = len(images)
            if not images:
                report.add("error", "empty-class", sub, "class folder without images")
            for p in images:
                report.files += 1
                bad = check_image(p, max_pixels)
                if bad:
                    report.add("error", bad[0], p, bad[1])
                    continue
                with Image.open(p) as im:
                    mode, size = im.mode, im.size
                sizes[size] += 1
                if mode not in KNOWN_MODES:
                    report.add("warning", "unexpected-mode", p, f"image mode {mode!r} has no documented conversion")
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                hashes[digest].add(split)
                first_path.setdefault(digest, p)
        report.classes[split] = counts
        if _numeric_order_differs(list(counts)):
            report.add("warning", "class-order", folder, "class names are numbers whose sorted order is not numeric "
                       f"({', '.join(sorted(counts))}); visrec maps labels by name, but tools that map by position "
                       "will disagree: pad them (01, 02, 10)")
    train = report.classes.get("train", {})
    if len([c for c in train if train[c]]) < 2 and "train" in report.classes:
        report.add("warning", "too-few-classes", layout["train"],
                   f"{len(train)} class folder(s): a classifier needs 2+ (generative models and style take one)")
    for split in ("val", "test"):
        for c in report.classes.get(split, {}):
            if c not in train:
                report.add("error", "unknown-class", layout[split] / c, f"class {c!r} does not exist in train/")
    for digest, found_in in hashes.items():
        if len(found_in) > 1:
            report.add("warning", "duplicate-across-splits", first_path[digest],
                       f"the same file is in {' and '.join(sorted(found_in))}: evaluation would see training images")
    mixed_sizes(report, root, sizes, image_size, fitted=True)
    return report


def validate_objects(name: str, image_size: int | None = None) -> Report:
    """`coco:PATH` or `yolo:PATH`: every annotation problem, each naming the file, the image or annotation id (or
    line) and what to do; COCO images of several sizes without `image_size`, as training refuses them."""
    from .coco import check_coco_folder
    from .yolo import scan_yolo_folder

    kind, _, path = name.partition(":")
    root = Path(path).expanduser()
    sizes: dict[str, dict[tuple[int, int], int]] = {}
    if kind == "coco":
        ann_files, docs, problems, located = check_coco_folder(root)
        n = sum(len(found) for found in located.values())
        for split, d in docs.items():
            for im in d["images"]:
                size = (im.get("width"), im.get("height"))
                sizes.setdefault(split, defaultdict(int))[size] += 1
    else:
        _, splits, problems = scan_yolo_folder(root)
        n = sum(len(items) for items in splits.values())
    report = Report(path, files=n)
    for p in problems:
        report.add(p.severity, p.where, p.file, f"{p.detail}: {p.fix}")
    for split, counts in sizes.items():  # read_coco refuses a split whose images differ in size
        mixed_sizes(report, ann_files[split], counts, image_size)
    return report
