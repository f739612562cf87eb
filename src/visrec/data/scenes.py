"""`scenes`: a generated dataset of small scenes for localization, detection, segmentation and captioning.

Each canvas (`data.scene_size`, default 64x64, grayscale) holds 1 to `data.max_objects` objects drawn from
Fashion-MNIST (`scenes`), MNIST (`scenes:mnist`) or scikit-learn's digits (`scenes:digits`), scaled 0.5-1.5x,
placed with bounded overlap (boxes overlap by IoU <= 0.3; later objects hide what they cover) on a plain or
textured background. Each scene has boxes and labels, instance masks (the visible pixels), a semantic mask, and a
caption from a small grammar that names the objects, their sizes and their spatial relations
("a large sneaker left of a small bag"). Training and validation scenes use only training-split objects, test
scenes only test-split objects.

`scenes:shapes` draws its own objects instead, as the Mask R-CNN "shapes" demo does: circles, squares and
triangles in random colors on a noisy color background (RGB).

Scenes are written once, seeded, as a COCO folder in the cache (images/, annotations/instances_*.json with RLE
masks, annotations/captions_*.json) and read back through the COCO reader, like any user's COCO folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import VisrecError, unknown_name
from ..io import atomic_folder
from .coco import write_coco
from .download import cache_dir

SOURCES = ("fashion-mnist", "mnist", "digits", "shapes")
SHAPES = ["circle", "square", "triangle"]
BASE = 28  # an object's size at scale 1 on a 64-pixel canvas (Fashion-MNIST's own size)
MAX_IOU = 0.3


def source_of(name: str) -> str:
    """`scenes` -> fashion-mnist; `scenes:mnist` -> mnist; `scenes:digits` -> digits."""
    src = name.split(":", 1)[1] if ":" in name else "fashion-mnist"
    if src not in SOURCES:
        raise unknown_name("scene object source", src, SOURCES, "scenes:SOURCE")
    return src


def word(class_name: str) -> str:
    """A class name as a caption word: `T-shirt/top` -> `t-shirt`, `Ankle boot` -> `ankle boot`, `3` -> `3`."""
    return class_name.split("/")[0].strip().lower()


def _objects(source: str, data_dir=None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """{"train": (uint8 N x 28 x 28, labels), "test": ...} and class names of the object source."""
    from .catalog import read_source

    raw, _ = read_source(source, data_dir)
    splits = {"train": (raw.train_images, raw.train_labels)}
    if raw.test_images is not None:
        splits["test"] = (raw.test_images, raw.test_labels)
    else:  # digits: a seeded fifth of the images become the test objects
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(raw.train_labels), generator=g)
        cut = len(perm) // 5
        splits = {"train": (raw.train_images[perm[cut:]], raw.train_labels[perm[cut:]]),
                  "test": (raw.train_images[perm[:cut]], raw.train_labels[perm[:cut]])}
    out = {}
    for s, (x, y) in splits.items():
        x = x[:, :1].float()
        if x.max() > 0:
            x = x * (255.0 / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1))
        x = F.interpolate(x, size=(BASE, BASE), mode="bilinear", antialias=True) if x.shape[-1] != BASE else x
        out[s] = (x[:, 0].round().clamp(0, 255).to(torch.uint8), y)
    return out, raw.classes


def _place(rng: np.random.Generator, placed: list[dict], size: int, min_side: int
           ) -> tuple[float, tuple[int, int, int, int]] | None:
    """(scale, square box) for a new object, 0.5-1.5x the base size, overlapping no placed one by IoU > MAX_IOU;
    None after 20 tries."""
    for _try in range(20):
        scale = float(rng.uniform(0.5, 1.5))
        side = max(min_side, round(BASE * scale * size / 64))
        if side >= size:
            continue
        x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_iou(box, p["box"]) <= MAX_IOU for p in placed):
            return scale, box
    return None


def _shape_mask(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A filled circle, square or triangle (apex up, or rotated by a random multiple of 90 degrees) in side x side."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    c = side / 2
    if kind == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= c ** 2
    if kind == "square":
        return np.ones((side, side), bool)
    tri = (yy >= 0) & (np.abs(xx - c) <= yy / 2)  # apex at the top middle, base along the bottom
    return np.rot90(tri, int(rng.integers(4))).copy()


def _shapes_scene(rng: np.random.Generator, size: int, max_objects: int):
    """(canvas uint8 H x W x 3, visible objects) of the shapes source: colored shapes on colored noise."""
    canvas = (rng.integers(0, 256, 3) * 0.5 + rng.normal(0, 20, (size, size, 3))).clip(0, 255).astype(np.float32)
    placed: list[dict] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        spot = _place(rng, placed, size, 6)
        if spot is None:
            continue
        _, box = spot
        x0, y0, side = box[0], box[1], box[2] - box[0]
        label = int(rng.integers(len(SHAPES)))
        shape = _shape_mask(SHAPES[label], side, rng)
        full = np.zeros((size, size), bool)
        full[y0:y0 + side, x0:x0 + side] = shape
        color = rng.integers(0, 256, 3).astype(np.float32)
        canvas[full] = color
        for p in placed:
            p["mask"] &= ~full
        placed.append({"label": label, "mask": full, "scale": side / (BASE * size / 64), "box": box})
    visible = [p for p in placed if p["mask"].sum() >= 4]
    return canvas.round().clip(0, 255).astype(np.uint8), visible


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    if rng.random() < 0.5:  # plain
        return np.full((size, size), rng.integers(0, 60), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
    stripes = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
    noise = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1)).repeat(8, 0).repeat(8, 1)[:size, :size]
    return (30 + 15 * stripes + 8 * noise).clip(0, 255).astype(np.float32)


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _scene(rng: np.random.Generator, images: torch.Tensor, labels: torch.Tensor, size: int, max_objects: int):
    """(canvas uint8 H x W, objects [{label, mask, scale, center}] in drawing order, visible masks)."""
    canvas = _background(rng, size)
    placed: list[dict] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        spot = _place(rng, placed, size, 4)
        if spot is None:
            continue
        scale, box = spot
        x0, y0, side = box[0], box[1], box[2] - box[0]
        i = int(rng.integers(len(labels)))
        obj = F.interpolate(images[i][None, None].float(), size=(side, side), mode="bilinear",
                            antialias=True)[0, 0].numpy()
        shape = obj > 40  # the object's pixels; the rest of its square stays background
        if shape.sum() < 4:
            continue
        full = np.zeros((size, size), bool)
        full[y0:y0 + side, x0:x0 + side] = shape
        region = canvas[y0:y0 + side, x0:x0 + side]
        region[shape] = obj[shape]
        for p in placed:  # what this object covers is no longer visible of the earlier ones
            p["mask"] &= ~full
        placed.append({"label": int(labels[i]), "mask": full, "scale": scale, "box": box})
    visible = [p for p in placed if p["mask"].sum() >= 4]
    return canvas.round().clip(0, 255).astype(np.uint8), visible


def _size_word(scale: float) -> str:
    return "small " if scale < 0.8 else "large " if scale > 1.2 else ""


def _relation(a: dict, b: dict) -> str:
    """Where `a` is relative to `b`, by the centers of their visible pixels (image y grows downwards)."""
    ya, xa = np.nonzero(a["mask"])
    yb, xb = np.nonzero(b["mask"])
    dx, dy = xa.mean() - xb.mean(), ya.mean() - yb.mean()
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption(objects: list[dict], classes: list[str]) -> str:
    """The grammar: `a [small|large] NAME (RELATION a [small|large] NAME)*`, objects from left to right."""
    def np_(o: dict) -> str:
        return f"a {_size_word(o['scale'])}{word(classes[o['label']])}"

    order = sorted(objects, key=lambda o: np.nonzero(o["mask"])[1].mean())
    parts = [np_(order[0])]
    for prev, o in zip(order, order[1:], strict=False):
        parts.append(f"{_relation(prev, o)} {np_(o)}")
    return " ".join(parts)


def scene_folder(name: str, count: int, size: int, max_objects: int, seed: int) -> Path:
    return cache_dir() / "scenes" / f"{source_of(name)}-n{count}-s{size}-k{max_objects}-seed{seed}"


def generate_scenes(name: str = "scenes", *, count: int = 10_000, size: int = 64, max_objects: int = 4,
                    seed: int = 0, data_dir=None, out: Path | None = None) -> Path:
    """Write the scenes as a COCO folder (train: `count`, val: count/10, test: count/5) unless already there;
    returns the folder. The folder appears complete or not at all."""
    if size < 16:
        raise VisrecError(f"data.scene_size={size} is too small for objects", "use 32 or more (default 64)")
    if not 1 <= max_objects <= 16:
        raise VisrecError(f"data.max_objects={max_objects} must be in 1..16")
    if count < 10:
        raise VisrecError(f"data.scene_count={count} must be at least 10")
    dest = out or scene_folder(name, count, size, max_objects, seed)
    if (dest / "annotations" / "instances_test.json").is_file():
        return dest
    source = source_of(name)
    objects, classes = ({}, SHAPES) if source == "shapes" else _objects(source, data_dir)
    with atomic_folder(dest) as tmp:
        (tmp / "images").mkdir()
        for k, (split, n, src) in enumerate((("train", count, "train"), ("val", max(count // 10, 2), "train"),
                                             ("test", max(count // 5, 2), "test"))):
            rng = np.random.default_rng([seed, k])
            names, objs, caps = [], [], []
            for i in range(n):
                if source == "shapes":
                    canvas, visible = _shapes_scene(rng, size, max_objects)
                else:
                    canvas, visible = _scene(rng, *objects[src], size, max_objects)
                fname = f"{split}_{i:06d}.png"
                Image.fromarray(canvas, mode="RGB" if canvas.ndim == 3 else "L").save(
                    tmp / "images" / fname, optimize=False, compress_level=1)
                names.append(fname)
                objs.append(visible)
                caps.append([caption(visible, classes)] if visible else ["an empty scene"])
            write_coco(tmp, split, names, [(size, size)] * n, objs, classes, caps)
    return dest
