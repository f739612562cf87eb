"""COCO folders, as users have them and as visrec writes its scenes.

    PATH/annotations/instances_<split>.json   images, annotations (xywh bbox, RLE or polygon segmentation, area,
                                              iscrowd), categories; <split> names train, val or test
                                              (`instances_train2017.json` is train)
    PATH/annotations/captions_<split>.json    optional: captions of the same images
    PATH/images/<file_name>, PATH/images/<split>/<file_name>, PATH/<split>2017/<file_name> or PATH/<file_name>

Categories map to contiguous class indices by name, in the train file's id order (any id, 0 included, is an
ordinary category). Images without annotations are kept as negatives. Masks are decoded with pycocotools into one
instance map per image (the later of two overlapping instances owns the shared pixels: the map a semantic label
is read from) and, where instances overlap, a second map of the other owner of each shared pixel, so every
instance keeps its whole mask (two owners per pixel are kept; a third, rare, loses it). Boxes of zero width or
height are left out (a warning); crowd regions (iscrowd=1) are kept with a `crowd` flag, so training leaves them
out and evaluation ignores what is detected on them, as COCO's evaluation does (a note). Every problem is
reported with the file, the image or annotation id, and what to do (`validate_coco` lists them all).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VisrecError
from ..io import write_json
from .images import Fit, decode, native_channels, peek

SPLITS = ("train", "val", "test")
NO_OBJECT = "(no object)"  # visrec's own class for images without objects, when classifying by largest object


@dataclass
class CocoProblem:
    severity: str  # error | warning | note
    file: str
    where: str  # "image 12", "annotation 7", ...
    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.detail} ({self.fix})"


@dataclass
class CocoSplit:
    """One split as read: images (uint8 N,C,H,W) with their targets, one row per image."""

    images: torch.Tensor
    boxes: list[np.ndarray]  # (m, 4) xyxy pixels of the stored image size
    labels: list[np.ndarray]  # (m,) contiguous class index
    instances: torch.Tensor | None  # (N, H, W) uint8, 0 = none, k = k-th box; None without segmentation
    overlaps: torch.Tensor | None = None  # (N, H, W) uint8: the other owner of pixels two instances share, or None
    captions: list[list[str]] = field(default_factory=list)
    crowd: list[np.ndarray] = field(default_factory=list)  # (m,) bool per image: the box is a crowd region
    # the dataset's own names for what visrec numbers: each image's id and file name, its size in the annotations
    # (height, width: boxes are scaled back to it for results files), each object's area there, and each class's
    # category id (COCO: the file's ids; YOLO: the class indices as given)
    image_ids: list[int] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    areas: list[np.ndarray] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    # with data.image_size, images are letterboxed (scaled to fit, padded bottom and right): the (height, width) each
    # image takes in the stored one
    content: list[tuple[int, int]] = field(default_factory=list)
    # each object's keypoints (m, K, 3): x, y in the stored image's pixels (scaled as its box), COCO's visibility
    # flag v (0: not labeled, its x, y zero; 1: labeled, hidden; 2: visible); empty when no annotation has keypoints
    keypoints: list[np.ndarray] = field(default_factory=list)


def split_of(path: Path) -> str | None:
    """`instances_train2017.json` -> train; `instances_val.json` -> val; a name with none of them -> None."""
    stem = path.stem.lower()
    for s in SPLITS:
        if re.search(rf"(^|[_\-.]){s}",
                     stem.removeprefix("instances").removeprefix("captions").removeprefix("person_keypoints")):
            return s
    return None


def annotation_files(root: Path) -> dict[str, Path]:
    ann = root / "annotations"
    if not ann.is_dir():
        raise VisrecError(f"{root} has no annotations/ folder: it is not a COCO folder",
                          "give the folder that holds annotations/instances_<split>.json")
    found: dict[str, Path] = {}
    # instances_*.json; a split that has none may be a keypoints file (COCO's person_keypoints_*.json)
    for p in [*sorted(ann.glob("instances_*.json")), *sorted(ann.glob("person_keypoints_*.json"))]:
        s = split_of(p)
        if s and s not in found:
            found[s] = p
    if "train" not in found:
        raise VisrecError(f"{ann} has no instances_train*.json", "COCO training annotations are needed to train")
    return found


def _load_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VisrecError(f"{path} is not readable JSON: {e}", "re-export the annotations") from None
    if not isinstance(d, dict) or not isinstance(d.get("images"), list):
        raise VisrecError(f"{path} has no 'images' list: it is not a COCO annotation file")
    return d


def find_image(root: Path, split_file: Path, file_name: str) -> Path | None:
    stem = split_file.stem.split("_", 1)[1] if "_" in split_file.stem else ""
    for cand in (root / "images" / file_name, root / "images" / (split_of(split_file) or "") / file_name,
                 root / stem / file_name, root / file_name):
        if cand.is_file():
            return cand
    return None


def check_split(root: Path, path: Path, d: dict[str, Any]) -> tuple[list[CocoProblem], dict[int, Path]]:
    """Every problem of one annotation file, and where each image's file is."""
    problems: list[CocoProblem] = []

    def bad(where: str, detail: str, fix: str, severity: str = "error") -> None:
        problems.append(CocoProblem(severity, str(path), where, detail, fix))

    cats = d.get("categories") or []
    cat_ids: dict[int, str] = {}
    for c in cats:
        if c.get("id") in cat_ids:
            bad(f"category {c.get('id')}", "duplicate category id", "give every category its own id")
        cat_ids[c.get("id")] = str(c.get("name"))
    names = list(cat_ids.values())
    for n in {n for n in names if names.count(n) > 1}:
        bad(f"category {n!r}", "two categories share this name", "categories are matched by name: rename one")
    images: dict[int, dict] = {}
    files: dict[int, Path] = {}
    for im in d["images"]:
        iid = im.get("id")
        if iid in images:
            bad(f"image {iid}", "duplicate image id", "give every image its own id")
            continue
        images[iid] = im
        f = find_image(root, path, str(im.get("file_name", "")))
        if f is None:
            bad(f"image {iid}", f"file {im.get('file_name')!r} not found under {root}/images or {root}",
                "put the image there, or remove its entry")
        else:
            files[iid] = f
    seen: set = set()
    degenerate: list[str] = []
    crowd = 0
    for a in d.get("annotations") or []:
        crowd += bool(a.get("iscrowd"))
        aid = a.get("id")
        where = f"annotation {aid} (image {a.get('image_id')})"
        if aid in seen:
            bad(where, "duplicate annotation id", "give every annotation its own id")
        seen.add(aid)
        im = images.get(a.get("image_id"))
        if im is None:
            bad(where, f"image_id {a.get('image_id')} is not among the images", "fix image_id or drop the annotation")
            continue
        if a.get("category_id") not in cat_ids:
            bad(where, f"unknown category_id {a.get('category_id')}",
                f"use one of the categories' ids: {sorted(cat_ids)[:20]}")
        w, h = im.get("width"), im.get("height")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)):
            bad(where, f"bbox {box!r} is not [x, y, width, height]", "write the box as four numbers")
        elif box[2] <= 0 or box[3] <= 0:
            degenerate.append(where)  # COCO 2017's own train file has two (height 0): left out, as torchvision does
        elif box[0] < -1 or box[1] < -1 or box[0] + box[2] > w + 1 or box[1] + box[3] > h + 1:
            bad(where, f"bbox {box} lies outside the {w}x{h} image", "clip the box to the image")
        seg = a.get("segmentation")
        if isinstance(seg, list):
            for poly in seg:
                if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                    bad(where, f"a polygon with {len(poly) // 2 if isinstance(poly, list) else 0} points",
                        "a polygon needs at least 3 (x, y) points; drop it or use RLE")
        elif isinstance(seg, dict):
            size = seg.get("size")
            if list(size or []) != [h, w]:
                bad(where, f"RLE mask of size {size} on a {w}x{h} image (size is [height, width])",
                    "encode the mask at the image's size")
    if degenerate:
        bad(f"{len(degenerate)} annotation(s)", f"have a box of zero width or height ({', '.join(degenerate[:3])}"
            + (" ..." if len(degenerate) > 3 else "") + ")",
            "they are left out: nothing can be learned or matched there; fix the boxes to keep them", "warning")
    if crowd:
        bad(f"{crowd} annotation(s)", "are crowd regions (iscrowd=1)",
            "they are left out of training, and evaluation ignores detections on them, as COCO's evaluation does",
            "note")
    return problems, files


def _mask(seg: Any, h: int, w: int) -> np.ndarray | None:
    from pycocotools import mask as mask_utils

    if isinstance(seg, list) and seg:
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg, dict):
        rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
    else:
        return None
    return mask_utils.decode(rle).astype(bool)


def check_coco_folder(root: Path) -> tuple[dict[str, Path], dict[str, dict], list[CocoProblem],
                                           dict[str, dict[int, Path]]]:
    """(annotation file per split, their contents, every problem, where each image's file is per split)."""
    files = annotation_files(root)
    docs = {s: _load_json(p) for s, p in files.items()}
    train_names = {str(c.get("name")) for c in docs["train"].get("categories") or []}
    problems: list[CocoProblem] = []
    located: dict[str, dict[int, Path]] = {}
    for s, d in docs.items():
        p, located[s] = check_split(root, files[s], d)
        problems += p
        extra = {str(c.get("name")) for c in d.get("categories") or []} - train_names
        if extra:
            problems.append(CocoProblem("error", str(files[s]), "categories",
                                        f"categories {sorted(extra)} are not in the train annotations",
                                        "train and evaluation files must share category names"))
        n_empty = len({im.get("id") for im in d["images"]} - {a.get("image_id") for a in d.get("annotations") or []})
        if n_empty:
            problems.append(CocoProblem("warning", str(files[s]), f"{n_empty} image(s)", "have no annotations",
                                        "they are kept as negatives (images with no object)"))
    return files, docs, problems, located


def problems_error(kind: str, root: Path, problems: list[CocoProblem]) -> VisrecError:
    """The error for annotation problems that stop reading: the first ten, and how to see them all."""
    shown = "\n    ".join(map(str, problems[:10]))
    more = f"\n    ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return VisrecError(f"{kind.upper()} folder {root} has {len(problems)} problem(s):\n    {shown}{more}",
                       f"see them all with: visrec validate {kind}:{root}")


def guess_channels(paths: list[Path]) -> int:
    """3 if any of the first 50 images has color, else 1 (read from the headers only)."""
    return 3 if any(native_channels(peek(p)[0]) == 3 for p in paths[:50]) else 1


def read_coco(root: str | Path, image_size: int | None = None, channels: int | None = None, *,
              stream: bool | None = False, memory_budget: int | None = None) -> tuple[list[str], dict[str, CocoSplit]]:
    """(class names, {split: CocoSplit}) of a COCO folder; images letterboxed to `image_size` (boxes and masks with
    them) when given, else all images must share one size. `stream`: images left in their files (StreamedImages)
    and masks drawn when read (LazyMasks); None: when the decoded images would take more than `memory_budget`."""
    root = Path(root).expanduser()
    files, docs, problems, located = check_coco_folder(root)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise problems_error("coco", root, errors)
    return coco_splits(files, docs, located, image_size, channels, stream=stream, memory_budget=memory_budget)


def coco_splits(files: dict[str, Path | str], docs: dict[str, dict], located: dict[str, dict[int, Any]],
                image_size: int | None, channels: int | None, *, stream: bool | None = False,
                memory_budget: int | None = None) -> tuple[list[str], dict[str, CocoSplit]]:
    """read_coco's work on checked documents: `located` says where each image is, per split (files, or samples in
    shards)."""
    train_cats = sorted(docs["train"].get("categories") or [], key=lambda c: c.get("id", 0))
    classes = [str(c["name"]) for c in train_cats]
    channels = channels or guess_channels(list(located["train"].values()))
    if stream is None:
        n = sum(len(d["images"]) for d in docs.values())
        side = image_size or max(max(im["height"], im["width"]) for d in docs.values() for im in d["images"])
        stream = memory_budget is not None and n * channels * side * side > memory_budget
    out = {s: _read_split(files[s], d, located[s], classes, image_size, channels, stream)
           for s, d in docs.items()}
    for sp in out.values():  # a class the split's file does not list keeps the train file's id
        sp.category_ids = [i if i is not None else c["id"] for i, c in zip(sp.category_ids, train_cats, strict=True)]
    return classes, out


def _read_split(path: Path, d: dict, located: dict[int, Path], classes: list[str],
                image_size: int | None, channels: int, stream: bool = False) -> CocoSplit:
    by_name = {str(c["name"]): classes.index(str(c["name"])) for c in d.get("categories") or []}
    cat = {c["id"]: by_name[str(c["name"])] for c in d.get("categories") or []}
    ids_here = {str(c["name"]): c["id"] for c in d.get("categories") or []}
    anns: dict[int, list[dict]] = {}
    for a in d.get("annotations") or []:
        if a["bbox"][2] > 0 and a["bbox"][3] > 0:  # zero-size boxes are left out (validation warns of them)
            anns.setdefault(a["image_id"], []).append(a)
    sizes = {(im["height"], im["width"]) for im in d["images"]}
    if image_size is None and len(sizes) > 1:
        raise VisrecError(f"{path}: images come in {len(sizes)} sizes ({sorted(sizes)[:4]} ...)",
                          "set data.image_size to resize them all to one square size")
    images, boxes, labels, crowd, inst_maps, over_maps, areas = [], [], [], [], [], [], []
    kp_count, keypoints = keypoint_count(d), []
    has_masks = any(a.get("segmentation") for a in d.get("annotations") or [])
    fit = Fit.square(image_size, mode="pad") if image_size else None  # the aspect ratio kept: a letterbox
    if stream:
        return _stream_split(d, located, anns, cat, classes, fit, channels, has_masks=any(
            a.get("segmentation") for a in d.get("annotations") or []), ids_here=ids_here, kp_count=kp_count)
    content = []
    for im in d["images"]:
        h, w = im["height"], im["width"]
        a = decode(located[im["id"]], channels, fit)
        if a.shape[:2] != (h, w) and image_size is None:
            raise VisrecError(f"{path}: image {im['id']} ({located[im['id']]}) is {a.shape[1]}x{a.shape[0]}, but the "
                              f"annotations say {w}x{h}", "fix width/height in the annotation file")
        oh, ow = fit.content(w, h) if fit else a.shape[:2]  # the image's part of the stored pixels
        content.append((oh, ow))
        own = anns.get(im["id"], [])
        b = _scaled_boxes(own, oh / h, ow / w, oh, ow)
        if kp_count:
            keypoints.append(_scaled_keypoints(own, kp_count, oh / h, ow / w))
        images.append(torch.from_numpy(a).permute(2, 0, 1))
        boxes.append(b)
        labels.append(np.array([cat[o["category_id"]] for o in own], dtype=np.int64))
        crowd.append(np.array([bool(o.get("iscrowd")) for o in own], dtype=bool))
        areas.append(np.array([float(o["area"]) if isinstance(o.get("area"), int | float)
                               else o["bbox"][2] * o["bbox"][3] for o in own], dtype=np.float64))
        if has_masks:
            inst, over = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
            for k, o in enumerate(own[:255], 1):
                m = _mask(o.get("segmentation"), h, w)
                if m is not None:
                    shared = m & (inst > 0)
                    over[shared] = inst[shared]  # the earlier owner of a shared pixel moves to the second map
                    inst[m] = k
            for maps, a_map in ((inst_maps, inst), (over_maps, over)):
                t = torch.from_numpy(a_map)
                if (oh, ow) != (h, w):
                    t = torch.nn.functional.interpolate(t[None, None].float(), size=(oh, ow), mode="nearest")[0, 0]
                if tuple(t.shape) != a.shape[:2]:  # the letterbox's padding holds no object
                    t = torch.nn.functional.pad(t, (0, a.shape[1] - ow, 0, a.shape[0] - oh))
                maps.append(t.to(torch.uint8))
    split = CocoSplit(torch.stack(images) if images else torch.zeros(0, channels, image_size or 1, image_size or 1,
                                                                     dtype=torch.uint8),
                      boxes, labels, torch.stack(inst_maps) if has_masks and inst_maps else None,
                      torch.stack(over_maps) if any(bool(m.any()) for m in over_maps) else None,
                      crowd=crowd if any(c.any() for c in crowd) else [],
                      image_ids=[im["id"] for im in d["images"]],
                      file_names=[str(im["file_name"]) for im in d["images"]],
                      sizes=[(int(im["height"]), int(im["width"])) for im in d["images"]], areas=areas,
                      category_ids=[ids_here.get(c) for c in classes], content=content if fit else [],
                      keypoints=keypoints)
    cap_file = path.parent / path.name.replace("instances_", "captions_", 1) if isinstance(path, Path) else None
    if cap_file is not None and cap_file.is_file():
        caps: dict[int, list[str]] = {}
        for c in _load_json(cap_file).get("annotations") or []:
            caps.setdefault(c.get("image_id"), []).append(str(c.get("caption", "")))
        split.captions = [caps.get(im["id"], []) for im in d["images"]]
    return split


def keypoint_count(d: dict) -> int:
    """K of a COCO document whose annotations carry `keypoints` (x, y, v triplets), else 0."""
    return max([len(a.get("keypoints") or []) // 3 for a in d.get("annotations") or []] + [0])


def _scaled_keypoints(own: list[dict], k: int, sy: float, sx: float) -> np.ndarray:
    """(m, k, 3) keypoints of an image's annotations, x and y scaled by (sx, sy); unlabeled ones (v = 0) zero."""
    out = np.zeros((len(own), k, 3), dtype=np.float32)
    for j, o in enumerate(own):
        kp = np.asarray(o.get("keypoints") or [], dtype=np.float32).reshape(-1, 3)[:k]
        out[j, : len(kp)] = kp
    out[..., 0] *= sx
    out[..., 1] *= sy
    out[out[..., 2] <= 0] = 0.0
    return out


def _scaled_boxes(own: list[dict], sy: float, sx: float, oh: int, ow: int) -> np.ndarray:
    """(m, 4) xyxy boxes of an image's annotations, scaled by (sx, sy) and clipped to its (oh, ow) stored part."""
    b = np.array([[x * sx, y * sy, (x + bw) * sx, (y + bh) * sy] for x, y, bw, bh in (o["bbox"] for o in own)],
                 dtype=np.float32).reshape(-1, 4)
    b[:, 0::2] = b[:, 0::2].clip(0, ow)
    b[:, 1::2] = b[:, 1::2].clip(0, oh)
    return b


def _stream_split(d: dict, located: dict[int, Path], anns: dict[int, list[dict]], cat: dict, classes: list[str],
                  fit: Fit | None, channels: int, has_masks: bool, ids_here: dict, kp_count: int = 0) -> CocoSplit:
    """A split whose images stay in their files and whose masks are drawn when read: the boxes, labels and names are
    what is kept, from the annotations alone (their sizes say where the letterbox puts each image)."""
    from .lazy_masks import LazyMasks, Raster
    from .stream import StreamedImages

    if fit is None:
        sizes = {(im["height"], im["width"]) for im in d["images"]}
        (h0, w0), = sizes  # one size (read_coco refused several without data.image_size)
        fit = Fit(h0, w0, mode="pad")
    content, boxes, labels, crowd, areas, objects, keypoints = [], [], [], [], [], [], []
    for im in d["images"]:
        h, w = im["height"], im["width"]
        oh, ow = fit.content(w, h)
        content.append((oh, ow))
        own = anns.get(im["id"], [])
        b = _scaled_boxes(own, oh / h, ow / w, oh, ow)
        if kp_count:
            keypoints.append(_scaled_keypoints(own, kp_count, oh / h, ow / w))
        boxes.append(b)
        labels.append(np.array([cat[o["category_id"]] for o in own], dtype=np.int64))
        crowd.append(np.array([bool(o.get("iscrowd")) for o in own], dtype=bool))
        areas.append(np.array([float(o["area"]) if isinstance(o.get("area"), int | float)
                               else o["bbox"][2] * o["bbox"][3] for o in own], dtype=np.float64))
        objects.append([o.get("segmentation") for o in own])
    sizes = [(int(im["height"]), int(im["width"])) for im in d["images"]]
    masks = None
    if has_masks:
        masks = LazyMasks(Raster(objects, sizes, content, (fit.height, fit.width), labels), "instances")
    images = StreamedImages([located[im["id"]] for im in d["images"]], channels, fit)
    return CocoSplit(images, boxes, labels, masks, masks.kind("overlaps") if masks is not None else None,
                     crowd=crowd if any(c.any() for c in crowd) else [],
                     image_ids=[im["id"] for im in d["images"]],
                     file_names=[str(im["file_name"]) for im in d["images"]], sizes=sizes, areas=areas,
                     category_ids=[ids_here.get(c) for c in classes], content=content, keypoints=keypoints)


def validate_coco(root: str | Path) -> list[CocoProblem]:
    """Every problem of a COCO folder, errors and warnings, without decoding any image."""
    return check_coco_folder(Path(root).expanduser())[2]


def write_coco(root: Path, split: str, file_names: list[str], sizes: list[tuple[int, int]],
               objects: list[list[dict[str, Any]]], classes: list[str], captions: list[list[str]] | None = None
               ) -> None:
    """annotations/instances_<split>.json (and captions_<split>.json) for images already under root/images.
    `objects[i]` holds dicts with `label` (class index), `mask` (bool H x W) for image i; boxes and areas come
    from the masks, segmentation as RLE."""
    from pycocotools import mask as mask_utils

    images, anns, ann_id = [], [], 1
    for i, (name, (h, w), objs) in enumerate(zip(file_names, sizes, objects, strict=True), 1):
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for o in objs:
            rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            anns.append({"id": ann_id, "image_id": i, "category_id": o["label"] + 1, "bbox": [x, y, bw, bh],
                         "area": float(mask_utils.area(rle)), "iscrowd": 0,
                         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
            ann_id += 1
    cats = [{"id": k + 1, "name": c, "supercategory": "object"} for k, c in enumerate(classes)]
    write_json(root / "annotations" / f"instances_{split}.json",
               {"info": {"description": "visrec"}, "images": images, "annotations": anns, "categories": cats})
    if captions is not None:
        caps = [{"id": j, "image_id": i, "caption": c}
                for j, (i, c) in enumerate(((i, c) for i, cs in enumerate(captions, 1) for c in cs), 1)]
        write_json(root / "annotations" / f"captions_{split}.json", {"images": images, "annotations": caps})


def to_targets(split: CocoSplit, no_object: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """(labels, targets) of a split as an ImageSet holds them: the label of each image is the class of its
    largest object (by box area), `no_object` for an image without one; boxes and their labels padded to the
    most objects any image has (labels -1 where there is none), the instance maps (and `overlaps`, the second owner
    of shared pixels, where instances overlap), the captions, and where a split has crowd regions, `crowd` (N, M)
    bool: those boxes are ignored, not objects (an image's label is its largest other object's); and the dataset's
    own `image_id`, `file_name`, `orig_size` and `area` of each image and object."""
    n, m = len(split.boxes), max([len(b) for b in split.boxes] + [1])
    boxes = torch.zeros(n, m, 4)
    box_labels = torch.full((n, m), -1, dtype=torch.long)
    labels = torch.full((n,), no_object, dtype=torch.long)
    crowd = torch.zeros(n, m, dtype=torch.bool)
    for i, (b, lab) in enumerate(zip(split.boxes, split.labels, strict=True)):
        if len(b):
            boxes[i, : len(b)] = torch.from_numpy(b)
            box_labels[i, : len(b)] = torch.from_numpy(lab)
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            if split.crowd:
                crowd[i, : len(b)] = torch.from_numpy(split.crowd[i])
                area = np.where(split.crowd[i], -1.0, area)  # a crowd region names the image only when alone
            labels[i] = int(lab[np.argmax(area)])
    targets: dict[str, Any] = {"boxes": boxes, "box_labels": box_labels}
    if split.crowd:
        targets["crowd"] = crowd
    if split.instances is not None:
        targets["instances"] = split.instances
    if split.overlaps is not None:
        targets["overlaps"] = split.overlaps
    if split.captions:
        targets["captions"] = split.captions
    if split.keypoints:  # (N, M, K, 3), each object's slot as its box's; zero where there is none
        k = split.keypoints[0].shape[1]
        kp = torch.zeros(n, m, k, 3)
        for i, a in enumerate(split.keypoints):
            kp[i, : len(a)] = torch.from_numpy(a)
        targets["keypoints"] = kp
    if split.image_ids:  # the dataset's own ids, names and sizes, for results files its own tools can score
        targets["image_id"] = torch.tensor(split.image_ids, dtype=torch.long)
        targets["file_name"] = list(split.file_names)
        targets["orig_size"] = torch.tensor(split.sizes, dtype=torch.long).reshape(-1, 2)
        area = torch.zeros(n, m, dtype=torch.float64)
        for i, a in enumerate(split.areas):
            area[i, : len(a)] = torch.from_numpy(a)
        targets["area"] = area
    if split.content:  # letterboxed: the part of each stored image that is the image
        targets["content_size"] = torch.tensor(split.content, dtype=torch.long).reshape(-1, 2)
    return labels, targets
