"""YOLO detection folders: `data.yaml` naming the image folders of each split and the class names, and one
`labels/.../NAME.txt` per image `images/.../NAME.EXT`, a line per object: `class cx cy w h`, normalized to [0, 1].

    path: .            # optional root of the relative folders below (default: the yaml's folder)
    train: images/train
    val: images/val    # optional, as is test
    names: [cat, dog]  # or {0: cat, 1: dog}

An image without a label file, or with an empty one, is a negative (no object). Every problem names the file,
the line and what to do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from ..errors import VisrecError
from .coco import CocoProblem, CocoSplit, guess_channels, problems_error
from .images import Fit, decode, is_image_file, peek


def _config(root: Path) -> tuple[Path, dict]:
    cfg_file = root if root.is_file() else root / "data.yaml"
    if not cfg_file.is_file():
        raise VisrecError(f"{root} has no data.yaml: it is not a YOLO folder",
                          "give the folder that holds data.yaml (train:, val:, names:)")
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise VisrecError(f"{cfg_file} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict) or "train" not in cfg or "names" not in cfg:
        raise VisrecError(f"{cfg_file} needs 'train' and 'names'", "e.g. train: images/train, names: [cat, dog]")
    return cfg_file, cfg


def _names(cfg_file: Path, names) -> list[str]:
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise VisrecError(f"{cfg_file}: names has ids {keys}; YOLO class ids run 0..N-1",
                              "number the classes from 0 without gaps")
        return [str(names[k]) for k in keys]
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise VisrecError(f"{cfg_file}: names must be a list or a mapping of class names")


def _images(base: Path, spec) -> list[Path]:
    out: list[Path] = []
    for entry in spec if isinstance(spec, list) else [spec]:
        p = base / str(entry)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file() and p.suffix == ".txt":  # a list of image paths
            out += [base / line.strip() for line in p.read_text().splitlines() if line.strip()]
        else:
            raise VisrecError(f"YOLO split folder {p} does not exist", "fix the path in data.yaml")
    return out


def label_file(image: Path) -> Path:
    """images/train/a.jpg -> labels/train/a.txt (the last `images` folder of the path becomes `labels`)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_labels(path: Path, n_classes: int) -> tuple[np.ndarray, list[CocoProblem]]:
    rows, problems = [], []
    if not path.is_file():
        return np.zeros((0, 5), np.float32), problems
    for i, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {i}"
        if len(fields) != 5:
            problems.append(CocoProblem("error", str(path), where, f"{len(fields)} fields: {line.strip()!r}",
                                        "each line is `class cx cy w h` (5 fields)"))
            continue
        try:
            c, *v = float(fields[0]), *map(float, fields[1:])
        except ValueError:
            problems.append(CocoProblem("error", str(path), where, f"not numbers: {line.strip()!r}",
                                        "each line is `class cx cy w h`"))
            continue
        if not c.is_integer() or not 0 <= c < n_classes:
            problems.append(CocoProblem("error", str(path), where, f"class {fields[0]} is not in 0..{n_classes - 1}",
                                        "use a class id from data.yaml's names"))
        elif any(not 0 <= x <= 1 for x in v):
            problems.append(CocoProblem("error", str(path), where, f"values {v} are outside [0, 1]",
                                        "YOLO coordinates are normalized by the image's width and height"))
        elif v[2] <= 0 or v[3] <= 0:  # left out, as COCO folders' zero-size boxes are
            problems.append(CocoProblem("warning", str(path), where, f"box of zero size {v}",
                                        "it is left out: nothing can be learned or matched there; fix or drop "
                                        "the line"))
        else:
            rows.append([c, *v])
    return np.array(rows, np.float32).reshape(-1, 5), problems


def scan_yolo_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, np.ndarray]]], list[CocoProblem]]:
    cfg_file, cfg = _config(root)
    classes = _names(cfg_file, cfg["names"])
    base = cfg_file.parent / str(cfg.get("path") or ".")
    splits, problems = {}, []
    for s in ("train", "val", "test"):
        if cfg.get(s):
            items = []
            for img in _images(base, cfg[s]):
                if not img.is_file():
                    problems.append(CocoProblem("error", str(cfg_file), s, f"image {img} not found",
                                                "fix the list of images"))
                    continue
                rows, p = _read_labels(label_file(img), len(classes))
                problems += p
                items.append((img, rows))
            splits[s] = items
    return classes, splits, problems


def validate_yolo(root: str | Path) -> list[CocoProblem]:
    return scan_yolo_folder(Path(root).expanduser())[2]


def read_yolo(root: str | Path, image_size: int | None = None, channels: int | None = None, *,
              stream: bool | None = False, memory_budget: int | None = None) -> tuple[list[str], dict[str, CocoSplit]]:
    """(class names, {split: CocoSplit}) of a YOLO folder, images letterboxed to `image_size` when given; `stream`:
    left in their files (None: when decoded they would take more than `memory_budget`)."""
    root = Path(root).expanduser()
    classes, splits, problems = scan_yolo_folder(root)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise problems_error("yolo", root, errors)
    channels = channels or guess_channels([p for p, _ in splits["train"]])
    if stream is None:
        n = sum(len(items) for items in splits.values())
        side = image_size or max(peek(splits["train"][0][0])[1])
        stream = memory_budget is not None and n * channels * side * side > memory_budget
    out = {}
    for s, items in splits.items():
        images, boxes, labels, orig, areas, content = [], [], [], [], [], []
        fit = Fit.square(image_size, mode="pad") if image_size else None  # the aspect ratio kept: a letterbox
        if stream and fit is None:  # one size, read from the headers: several need data.image_size
            first = {peek(path)[1] for path, _ in items}
            if len(first) > 1:
                raise VisrecError(f"YOLO folder {root}: {s} images come in {len(first)} sizes",
                                  "set data.image_size to letterbox them all to one square size")
            (w1, h1), = first
            fit = Fit(h1, w1, mode="pad")
        for path, rows in items:
            a = None if stream else decode(path, channels, fit)
            h0, w0 = a.shape[:2] if fit is None else peek(path)[1][::-1]
            h, w = fit.content(w0, h0) if fit else (h0, w0)  # the image's part of the stored pixels
            content.append((h, w))
            orig.append((h0, w0))
            areas.append((rows[:, 3] * w0 * rows[:, 4] * h0).astype(np.float64))
            cx, cy, bw, bh = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
            boxes.append(np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h],
                                  1).astype(np.float32).reshape(-1, 4))
            labels.append(rows[:, 0].astype(np.int64))
            if a is not None:
                images.append(torch.from_numpy(a).permute(2, 0, 1))
        if stream:
            from .stream import StreamedImages

            out[s] = CocoSplit(StreamedImages([p for p, _ in items], channels, fit), boxes, labels, None,
                               image_ids=list(range(1, len(items) + 1)),
                               file_names=[_relative(p, root) for p, _ in items], sizes=orig, areas=areas,
                               category_ids=list(range(len(classes))), content=content)
            continue
        sizes = {tuple(t.shape) for t in images}
        if len(sizes) > 1:
            raise VisrecError(f"YOLO folder {root}: {s} images come in {len(sizes)} sizes",
                              "set data.image_size to resize them all to one square size")
        # image ids number the split's files from 1 in reading order; category ids are YOLO's class indices
        out[s] = CocoSplit(torch.stack(images), boxes, labels, None, image_ids=list(range(1, len(items) + 1)),
                           file_names=[_relative(p, root) for p, _ in items], sizes=orig, areas=areas,
                           category_ids=list(range(len(classes))), content=content if fit else [])
    return classes, out


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root if root.is_dir() else root.parent).as_posix()
    except ValueError:
        return str(path)
