"""Object detection and instance segmentation: every object of an image, its class and box (and its pixels), from
torchvision's detection models on visrec's backbones (`visrec.models.detect`).

Targets are the data's boxes (xyxy pixels, padded with label -1) and, for instances, its instance maps; flips
and crops move them with the pixels. Objects a crop cut away, and boxes under a pixel wide, are left out of
the loss; images without objects train as negatives. The loss is the sum of the model's own terms (R-CNN:
objectness, proposal box, classifier, box, mask; RetinaNet/FCOS: focal classification, box regression, ...).

Evaluation is the official COCO evaluator's (pycocotools), on a COCO ground truth made from the split as the
run sees it: `map` (AP averaged over IoU 0.50:0.95), `map50`, `map75`, `map_small/medium/large`, `ar100`,
and for instances the same of the masks (`mask_map`, ...). Per-class AP and precision-recall curves come from
the same evaluation. The test split's detections are written, at the end of training and by `visrec eval`,
as a COCO results file (`predictions_test.json`) next to the ground truth it was scored against
(`ground_truth_test.json`): `COCOeval` on the two files gives the same numbers.

Sizes are fitted to the training boxes unless given in `model.kwargs`: the side images are resized to, so that
the smallest objects (5th percentile) span 4 strides of the finest pyramid level the model reads, the range of
object sizes the anchors are kept in, and the anchors' aspect ratios, from the boxes' shapes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Dataset, ImageSet, Normalizer
from ..data.coco import NO_OBJECT
from ..device import autocast
from ..errors import VisrecError
from ..io import write_json
from ..prediction import Answer, Prediction, Predictor, Prepared, hex_color, png_data_uri
from ..training.task import EvalSettings, Evaluation, Task


def object_classes(classes: list[str]) -> list[str]:
    """The dataset's object classes: visrec's `(no object)` image class is not one."""
    return [c for c in classes if c != NO_OBJECT]


def to_torchvision(targets: dict[str, torch.Tensor], masks: bool) -> list[dict[str, torch.Tensor]]:
    """Padded batch targets -> torchvision's list of {boxes, labels(, masks)}; cut-away and sub-pixel boxes left
    out (torchvision refuses boxes without area), and crowd regions (no object to learn, as in torchvision's COCO
    reference)."""
    boxes, labels = targets["boxes"].float(), targets["box_labels"]
    wh = boxes[..., 2:] - boxes[..., :2]
    keep = (labels >= 0) & (wh >= 1).all(-1)
    if "crowd" in targets:
        keep &= ~targets["crowd"]
    out = []
    for i in range(len(boxes)):
        k = keep[i]
        t = {"boxes": boxes[i][k], "labels": labels[i][k]}
        if masks:
            slots = k.nonzero()[:, 0] + 1  # instance map value of each kept box
            t["masks"] = instance_masks(targets, i, slots).to(torch.uint8)
        out.append(t)
    return out


def instance_masks(targets: dict[str, torch.Tensor], i: int, slots: torch.Tensor) -> torch.Tensor:
    """(len(slots), H, W) bool: image i's whole mask of each object slot (1-based), shared pixels included (the
    instance map and, where instances overlap, the map of their other owners)."""
    inst = targets["instances"][i]
    s = slots.to(inst.dtype)[:, None, None]
    out = inst[None] == s
    if "overlaps" in targets:
        out |= targets["overlaps"][i][None] == s
    return out


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode()}


@dataclass
class CocoNames:
    """How a split's images and classes are named in the COCO files visrec writes: the dataset's own image ids,
    file names, sizes and category ids when it has them (COCO and YOLO folders), so that its own tools score the
    files against its own annotations; else image i is id i + 1 and class k is category k + 1."""

    image_ids: list[int]
    file_names: list[str] | None
    sizes: list[tuple[int, int]]  # (height, width) in the annotations: boxes and masks are written at that size
    category_ids: list[int]
    content: list[tuple[int, int]] | None = None  # letterboxed images: the (height, width) each takes when stored

    @classmethod
    def of(cls, data: ImageSet, n_classes: int) -> CocoNames:
        t = data.targets or {}
        cats = list(data.category_ids) if data.category_ids else [k + 1 for k in range(n_classes)]
        content = [tuple(s) for s in t["content_size"].tolist()] if "content_size" in t else None
        if "image_id" in t:
            return cls(t["image_id"].tolist(), list(t["file_name"]), [tuple(s) for s in t["orig_size"].tolist()],
                       cats, content)
        h, w = (int(v) for v in data.images.shape[-2:])
        return cls(list(range(1, len(data) + 1)), None, [(h, w)] * len(data), cats, content)

    def image(self, i: int, stored: tuple[int, int]) -> tuple[dict[str, Any], float, float]:
        """Image i's COCO entry, and the scale (sx, sy) from the stored pixels to the annotation's."""
        h, w = self.sizes[i]
        entry: dict[str, Any] = {"id": self.image_ids[i], "width": w, "height": h}
        if self.file_names is not None:
            entry["file_name"] = self.file_names[i]
        sh, sw = self.region(i, stored)
        return entry, w / sw, h / sh

    def region(self, i: int, stored: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) of the stored pixels that are image i (all of them, unless letterboxed)."""
        return self.content[i] if self.content is not None else stored


def _resized_mask(mask: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """A (H, W) mask or probability map at another (height, width)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode=mode, **kw)[0, 0]


def coco_ground_truth(data: ImageSet, classes: list[str], masks: bool) -> dict[str, Any]:
    """The split as a COCO instances document, in the dataset's own ids and pixels (`CocoNames`); the area of an
    object is the annotation's where the data has it (COCO's small/medium/large split by it), else its mask's or
    box's; crowd regions keep iscrowd=1, so COCOeval ignores the detections that fall on them."""
    t = data.targets or {}
    crowd, area, inst = t.get("crowd"), t.get("area"), t.get("instances")
    names = CocoNames.of(data, len(classes))
    stored = tuple(int(v) for v in data.images.shape[-2:])
    images, anns = [], []
    for i in range(len(data)):
        entry, sx, sy = names.image(i, stored)
        images.append(entry)
        full = (entry["height"], entry["width"])
        for slot in (t["box_labels"][i] >= 0).nonzero()[:, 0].tolist():
            x0, y0, x1, y1 = t["boxes"][i, slot].tolist()
            x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
            a = {"id": len(anns) + 1, "image_id": entry["id"],
                 "category_id": names.category_ids[int(t["box_labels"][i, slot])],
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                 "iscrowd": int(crowd is not None and bool(crowd[i, slot]))}
            m = None
            if inst is not None:
                whole = instance_masks(t, i, torch.tensor([slot + 1]))[0]
                rh, rw = names.region(i, stored)  # a letterbox's padding is no part of the image
                m = _resized_mask(whole[:rh, :rw].to(torch.uint8), full, "nearest").bool().numpy()
                if m.any():
                    a["area"] = float(m.sum())
            if area is not None and float(area[i, slot]) > 0:
                a["area"] = float(area[i, slot])
            if masks and m is not None:
                a["segmentation"] = _rle(m)
            anns.append(a)
    cats = [{"id": cid, "name": c, "supercategory": "object"}
            for cid, c in zip(names.category_ids, classes, strict=True)]
    return {"info": {"description": "visrec evaluation ground truth"}, "images": images, "annotations": anns,
            "categories": cats}


def coco_results(detections: list[dict[str, torch.Tensor]], names: CocoNames | None = None,
                 stored: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Detections (one dict per image, visrec class indices, `stored` pixels) -> the COCO results format in the
    dataset's ids and pixels (`names`; default: image i + 1, category k + 1, as detected): xywh boxes, and for masks
    an RLE of the mask thresholded at 0.5."""
    out = []
    for i, d in enumerate(detections):
        image_id, sx, sy, full = i + 1, 1.0, 1.0, None
        if names is not None:
            entry, sx, sy = names.image(i, stored)
            image_id, full = entry["id"], (entry["height"], entry["width"])
        boxes = (d["boxes"] * torch.tensor([sx, sy, sx, sy])).tolist()
        masks = d.get("masks")
        for j, ((x0, y0, x1, y1), lab, s) in enumerate(zip(boxes, d["labels"].tolist(), d["scores"].tolist(),
                                                         strict=True)):
            r = {"image_id": image_id, "category_id": names.category_ids[int(lab)] if names else int(lab) + 1,
                 "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)], "score": round(s, 5)}
            if masks is not None:
                if full is None:
                    m = masks[j, 0]
                else:
                    rh, rw = names.region(i, stored)
                    m = _resized_mask(masks[j, 0, :rh, :rw], full, "bilinear")
                r["segmentation"] = _rle((m > 0.5).numpy())
            out.append(r)
    return out


STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large", "ar1", "ar10", "ar100", "ar_small",
         "ar_medium", "ar_large")  # the order of COCOeval.stats


def coco_evaluate(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str = "bbox"
                  ) -> tuple[dict[str, float], np.ndarray | None]:
    """pycocotools' COCOeval: ({map, map50, ..., ar100}, precision array (T, R, K, A, M) or None).
    No detections at all scores 0 (the evaluator itself cannot load an empty results list); a metric without
    ground truth (no small objects, say) is NaN, where pycocotools prints -1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not results:
            return {k: (0.0 if gt["annotations"] else math.nan) for k in STATS}, None
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) if v >= 0 else math.nan) for k, v in zip(STATS, ev.stats, strict=True)}, ev.eval["precision"]


def per_class_ap(precision: np.ndarray | None, k: int, iou_index: int | None = None) -> float | None:
    """AP of category index k from COCOeval's precision array (all areas, 100 detections): averaged over the IoU
    thresholds, or at one of them; None when the class has no ground truth."""
    if precision is None:
        return None
    p = precision[:, :, k, 0, -1] if iou_index is None else precision[iou_index, :, k, 0, -1]
    p = p[p > -1]
    return float(p.mean()) if p.size else None


@torch.no_grad()
def detect(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, *, batch_size: int = 64,
           amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> list[dict[str, torch.Tensor]]:
    """The model's detections for uint8 images, on the CPU: {boxes xyxy pixels, labels, scores(, masks)}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mf = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    try:
        for chunk in images.split(max(1, batch_size)):
            x = normalizer(chunk.to(device)).contiguous(memory_format=mf)
            with autocast(device, amp_dtype):
                dets = model(x)
            out += [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()} for d in dets]
    finally:
        model.train(was_training)
    return out


@dataclass
class DetectionEvaluation(Evaluation):
    classes: list[str] = field(default_factory=list)
    per_class_ap: list[float | None] = field(default_factory=list)
    per_class_ap50: list[float | None] = field(default_factory=list)
    pr_curves: list[list[float]] = field(default_factory=list)  # precision at IoU 0.5, 101 recall points
    results: list[dict[str, Any]] = field(default_factory=list)
    ground_truth: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, **self.metrics,
                "per_class_ap": dict(zip(self.classes, self.per_class_ap, strict=True)),
                "per_class_ap50": dict(zip(self.classes, self.per_class_ap50, strict=True)),
                "detections": len(self.results), "seconds": self.seconds}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        write_json(folder / f"ground_truth_{self.split}.json", self.ground_truth)
        write_json(folder / f"predictions_{self.split}.json", self.results)
        write_json(folder / f"pr_curves_{self.split}.json",
                   {"recall": [round(r, 2) for r in np.linspace(0, 1, 101)], "iou": 0.5,
                    "precision": dict(zip(self.classes, self.pr_curves, strict=True))})
        from ..io import atomic_path

        with atomic_path(folder / "per_class_ap.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "ap", "ap50"])
            for name, ap, ap50 in zip(self.classes, self.per_class_ap, self.per_class_ap50, strict=True):
                w.writerow([name, "" if ap is None else f"{ap:.6f}", "" if ap50 is None else f"{ap50:.6f}"])


# torchvision's reference recipe for its detectors: momentum SGD at 0.02 for batches of 16, weight decay 1e-4, a
# short warmup; gradients clipped, since a detector's early box losses can spike
DETECTOR_RECIPE: dict[str, Any] = {
    "optim.name": "momentum", "optim.lr": 0.02, "optim.weight_decay": 1e-4, "optim.grad_clip": 10.0,
    "schedule.name": "cosine", "schedule.warmup_epochs": 0.3, "schedule.start_factor": 0.01,
    "train.batch_size": 16, "train.epochs": 12, "eval.tta": "none",
}


@dataclass
class FoundObjects(Answer):
    """The objects found in one input: [{class, box (x0, y0, x1, y1 in the input's own pixels), score, color(, mask
    as COCO RLE)}], and for instance runs the masks over the input as one PNG data URI."""

    objects: list[dict[str, Any]]
    mask: str | None = None
    min_score: float = 0.5
    found: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the kept detections, for drawing
    classes: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"objects": self.objects, **({"mask": self.mask} if self.mask is not None else {})}

    def text(self) -> str:
        found = ", ".join(f"{o['class']} {o['score']:.2f} at {[round(v) for v in o['box']]}" for o in self.objects)
        return found or f"no object scores {self.min_score} or more"

    def draw(self, item: Prepared) -> bytes:
        from ..plotting import pyplot
        from .draw import _rgb, draw_boxes, overlay

        plt = pyplot()
        x, d = item.x, self.found
        h, w = x.shape[-2:]
        fig, ax = plt.subplots(figsize=(max(3, w / 40), max(3, h / 40) * h / max(w, 1)))
        ax.axis("off")
        img = _rgb(x)
        if "masks" in d:
            img = overlay(img, [(m[0] > 0.5).numpy() for m in d["masks"]], d["labels"].tolist())
        ax.imshow(img)
        draw_boxes(ax, d["boxes"], d["labels"].tolist(), self.classes, "#c0392b", d["scores"].tolist())
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()


class DetectionPredictor(Predictor):
    """Objects in inputs of any size: decoded as training decoded its images, resized by the detector itself, boxes
    in each input's own pixels; one forward per input (the detector batches internally anyway)."""

    outputs = "structured"  # dicts of boxes: eager backends only
    any_size = True
    settings = {"min_score": 0.5}
    formats = ("text", "json", "coco")
    draws = True

    def setup(self) -> None:
        ms = self.options["min_score"]
        if not 0 <= ms <= 1:
            raise VisrecError(f"--min-score {ms} is not a probability", "give a score in 0..1, e.g. 0.5")
        self.object_names = object_classes(self.classes)

    def answer(self, items: list[Prepared], outputs: Any, top_k: list[int]) -> list[Answer]:
        min_score = self.options["min_score"]
        res: list[Answer] = []
        for p in items:
            d = detect(self.lm.model, p.x[None], self.lm.normalizer)[0]
            keep = d["scores"] >= min_score
            objs, masks = [], []
            for j in keep.nonzero()[:, 0].tolist():
                k = int(d["labels"][j])
                o = {"class": self.object_names[k], "box": [round(v, 2) for v in d["boxes"][j].tolist()],
                     "score": round(float(d["scores"][j]), 4), "color": hex_color(self.colors[k + 1])}
                if "masks" in d:
                    m = (d["masks"][j, 0] > 0.5).numpy()
                    o["mask"] = _rle(m)
                    masks.append((m, k + 1))
                objs.append(o)
            overlay_uri = None
            if masks:
                rgba = np.zeros((p.height, p.width, 4), dtype=np.uint8)
                for m, k in masks:
                    rgba[m, :3] = self.colors[k]
                    rgba[m, 3] = 150
                overlay_uri = png_data_uri(rgba)
            res.append(FoundObjects(objs, overlay_uri, min_score, {k: v[keep] for k, v in d.items()},
                                    self.object_names))
        return res

    def write(self, fmt: str, predictions: list[Prediction], inputs: list[Path], say,
              annotations: Path | None = None) -> str:
        """`coco`: the predictions as a COCO results file in the ids of the user's annotations (default: the run's
        own COCO folder), saying through `say` how the inputs were numbered."""
        import json

        if fmt != "coco":
            return super().write(fmt, predictions, inputs, say)
        results, how = coco_results_for(self.run, predictions, inputs, classes=self.object_names,
                                        annotations=annotations)
        say(f"image ids: {how}")
        return json.dumps(results)


class DetectionTask(Task):
    """Every object of an image, its class and box: torchvision's Faster R-CNN, RetinaNet or FCOS on a zoo backbone,
    scored by pycocotools (COCO mAP)."""

    name = "detection"
    Predictor = DetectionPredictor
    recipe = {"model.name": "fasterrcnn_resnet18", **DETECTOR_RECIPE}
    random_crops = False  # targets in the images' pixels (or words about them): images read whole
    target = "boxes"
    primary = "map"
    overfit_metric = "map50"  # the doctor's memorization check: every object found, boxes roughly right
    # visrec search around the detector's recipe: learning rates near 0.02 in batches of 16 (label smoothing does not
    # reach its losses)
    search_space = {"optim.lr": {"loguniform": [0.002, 0.08]}, "optim.weight_decay": {"loguniform": [1.0e-5, 1.0e-3]},
                    "train.batch_size": {"categorical": [8, 16, 32]}}
    maximize = True
    stats = ()
    masks = False
    families = ("detection", "instance")

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.classes: list[str] = []

    # ---------------------------------------------------------------- data and model

    def check(self, ds: Dataset) -> None:
        for split, data in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
            if data is None:
                continue
            t = data.targets or {}
            if "boxes" not in t:
                raise VisrecError(f"task {self.name} needs boxes, and {ds.name} has none",
                                  "use a dataset with boxes: scenes, coco:PATH or yolo:PATH; "
                                  "a classification dataset trains with --task classification")
            if self.masks and "instances" not in t:
                raise VisrecError(f"task instance needs object masks, and the {split} split of {ds.name} has none",
                                  "use scenes or a coco:PATH folder with segmentation polygons or RLE masks; "
                                  "for boxes alone, --task detection")
        self.classes = object_classes(ds.classes)
        if not self.classes:
            raise VisrecError(f"{ds.name} has no object classes")

    def num_outputs(self, ds: Dataset) -> int:
        self.classes = object_classes(ds.classes)
        return len(self.classes)

    def check_model(self, model: nn.Module, ds: Dataset) -> None:
        if not getattr(model, "detector", False):
            raise VisrecError(f"task {self.name} needs a detection model; {type(model).__name__} outputs class scores",
                              "use --model maskrcnn_resnet18" if self.masks else
                              "use --model fasterrcnn_resnet18 (two-stage) or retinanet_resnet18 (single-stage); "
                              "`visrec models --family detection` lists them")
        if self.masks and not getattr(model, "masks", False):
            raise VisrecError(f"task instance needs a model with a mask head; {self.cfg.model.name} has none",
                              "use --model maskrcnn_resnet18 (or --task detection for boxes alone)")

    def model_kwargs(self, ds: Dataset, model_name: str) -> dict[str, Any]:
        """Sizes fitted to the training boxes (see the module's docstring) for a registered detector."""
        from ..models import model_entry
        from ..models.detect import HEADS

        try:
            entry = model_entry(model_name)
        except VisrecError:
            return {}
        if entry.family not in self.families:
            return {}
        head = model_name.split("_", 1)[0]
        return fit_sizes(ds.train, head if head in HEADS else "fasterrcnn", self.cfg.model.kwargs.get("min_size"))

    def targets(self, data: ImageSet) -> dict[str, torch.Tensor]:
        t = data.targets
        out = {"boxes": t["boxes"].float(), "box_labels": t["box_labels"]}
        if "crowd" in t:
            out["crowd"] = t["crowd"]
        if self.masks:
            out["instances"] = t["instances"]
            if "overlaps" in t:
                out["overlaps"] = t["overlaps"]
        return out

    # ---------------------------------------------------------------- training

    def forward(self, model: nn.Module, x: torch.Tensor, targets: Any) -> Any:
        return model(x, to_torchvision(targets, self.masks)) if model.training else model(x)

    def statistics_forward(self, model: nn.Module, x: torch.Tensor) -> None:
        """Batch norm lives in the backbone: its pass alone recalibrates the averaged weights (the heads take
        targets in training)."""
        model.net.backbone(x)

    def loss(self, outputs: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        return sum(v.float() for v in outputs.values())

    def batch_stats(self, outputs: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        return targets["boxes"].new_zeros(0)

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> DetectionEvaluation:
        t0 = time.perf_counter()
        dets = detect(model, data.images, normalizer, batch_size=min(settings.batch_size, 128),
                      amp_dtype=settings.amp_dtype, channels_last=settings.channels_last)
        t1 = time.perf_counter()
        return self.score(dets, data, split, {"model": t1 - t0})

    def score(self, dets: list[dict[str, torch.Tensor]], data: ImageSet, split: str,
              seconds: dict[str, float] | None = None) -> DetectionEvaluation:
        """COCO metrics of detections on `data` (one dict per image, in order)."""
        t1 = time.perf_counter()
        classes = self.classes or object_classes(data.classes)
        gt = coco_ground_truth(data, classes, self.masks)
        results = coco_results(dets, CocoNames.of(data, len(classes)), tuple(data.images.shape[-2:]))
        metrics, precision = coco_evaluate(gt, results, "bbox")
        per_ap = [per_class_ap(precision, k) for k in range(len(classes))]
        per_ap50 = [per_class_ap(precision, k, 0) for k in range(len(classes))]
        pr = [(precision[0, :, k, 0, -1].clip(min=0).round(4).tolist() if precision is not None else [0.0] * 101)
              for k in range(len(classes))]
        if self.masks:
            mm, mprec = coco_evaluate(gt, results, "segm")
            metrics.update({f"mask_{k}": v for k, v in mm.items()})
            per_ap = [per_class_ap(mprec, k) for k in range(len(classes))]
            per_ap50 = [per_class_ap(mprec, k, 0) for k in range(len(classes))]
        n = max(len(data), 1)
        secs = dict(seconds or {})
        secs["coco_eval"] = time.perf_counter() - t1
        metrics["ms_per_image"] = 1000 * secs.get("model", 0.0) / n
        return DetectionEvaluation(split, metrics, classes, per_ap, per_ap50, pr, results, gt,
                                   {k: round(v, 3) for k, v in secs.items()})

    def at_chance(self, test: Evaluation, ds: Dataset) -> str | None:
        v = test.metrics.get(self.primary, 0.0)
        if not math.isnan(v) and v <= 0.01:
            return f"the detector found almost no test object ({self.primary} {v:.3f})"
        return None

    def summary_fields(self, test: Evaluation | None) -> dict[str, Any]:
        kw = self.cfg.model.kwargs
        out = {k: kw[k] for k in ("min_size", "object_sizes", "anchor_sizes", "aspect_ratios") if k in kw}
        if isinstance(test, DetectionEvaluation):  # the detector's and the COCO evaluator's time on the test split
            out["test_seconds"] = test.seconds
        return out

    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 8,
                folder: Path | None = None) -> dict[str, bytes]:
        from .draw import detection_grid, pr_curve_figure

        out: dict[str, bytes] = {}
        n = min(n, len(data))
        if n:
            dets = detect(model, data.images[:n], normalizer)
            kind = "boxes and masks" if self.masks else "boxes"
            out[f"Test images: true {kind} (green, left) and predicted (red, right; score >= 0.5)"] = detection_grid(
                data.images[:n], {k: v[:n] for k, v in self.targets(data).items()}, dets,
                self.classes or object_classes(data.classes), masks=self.masks)
        if folder is not None and (folder / "pr_curves_test.json").is_file():
            out["Precision-recall curves of the test split at IoU 0.5, per class (legend: AP@0.5)"] = (
                pr_curve_figure(folder / "pr_curves_test.json", folder / "per_class_ap.csv"))
        return out


class InstanceTask(DetectionTask):
    """Every object's class, box and pixels: torchvision's Mask R-CNN on a zoo backbone, scored by pycocotools
    (mask and box AP)."""

    name = "instance"
    recipe = {"model.name": "maskrcnn_resnet18", **DETECTOR_RECIPE}
    target = "masks"
    primary = "mask_map"
    overfit_metric = "mask_map50"
    masks = True
    families = ("instance",)


def fit_sizes(train: ImageSet, head: str, min_size: int | None = None) -> dict[str, Any]:
    """min_size/max_size, object_sizes and aspect_ratios for the training boxes (see the module's docstring); with
    a given `min_size`, the object sizes at that scale."""
    t = train.targets or {}
    if "boxes" not in t:
        return {}  # nothing to fit to: the task's data check says what is missing
    h, w = train.images.shape[-2:]
    real = t["box_labels"] >= 0
    if "crowd" in t:
        real &= ~t["crowd"]
    boxes = t["boxes"][real].float()
    short = min(h, w)
    if len(boxes) == 0:
        return {}
    bw, bh = (boxes[:, 2] - boxes[:, 0]).clamp_min(1), (boxes[:, 3] - boxes[:, 1]).clamp_min(1)
    side = (bw * bh).sqrt()
    q = torch.quantile(side, torch.tensor([0.02, 0.05, 0.98]))
    if min_size is None:
        # the smallest objects should span 4 strides of the finest level the head reads (R-CNN: P2, stride 4;
        # single-stage: P3, stride 8, with the strided stem a resized image of 96 pixels or more gets)
        scale = (4 * (4 if head in ("fasterrcnn", "maskrcnn") else 8)) / float(q[1])
        scale = 1.0 if scale <= 1.25 else min(scale, 4.0)
        min_size = short if scale == 1.0 else int(math.ceil(short * scale / 16) * 16)
    scale = min_size / short
    ar = (bh / bw).log()
    qs = torch.quantile(ar, torch.tensor([0.1, 0.5, 0.9])).exp().tolist()
    return {"min_size": int(min_size), "max_size": int(math.ceil(max(h, w) * scale)),
            "object_sizes": [round(float(q[0]) * scale * 0.9, 1), round(float(q[2]) * scale * 1.1, 1)],
            "aspect_ratios": sorted({round(r, 2) for r in qs})}


# -------------------------------------------------------------------- predicting image files


def coco_results_of(preds: list[Prediction], category_ids: dict[str, int], image_ids: list[int]
                    ) -> list[dict[str, Any]]:
    """Predictions as a COCO results file: input i is `image_ids[i]`, a class is its dataset category id."""
    out = []
    for p, image_id in zip(preds, image_ids, strict=True):
        for o in p.answer.objects if p.answer is not None else []:
            x0, y0, x1, y1 = o["box"]
            r = {"image_id": image_id, "category_id": category_ids[o["class"]],
                 "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "score": o["score"]}
            if "mask" in o:
                r["segmentation"] = o["mask"]
            out.append(r)
    return out


def run_category_ids(run, classes: list[str]) -> dict[str, int]:
    """Each object class's category id in the run's data (recorded in splits.json at training; runs from before
    it, and data without ids: class k is category k + 1)."""
    import json

    ids = None
    with contextlib.suppress(OSError, ValueError):
        ids = json.loads((Path(run.path) / "splits.json").read_text()).get("category_ids")
    if not ids or len(ids) != len(classes):
        ids = [k + 1 for k in range(len(classes))]
    return dict(zip(classes, ids, strict=True))


def annotated_images(annotations: str | Path) -> tuple[dict[Path, int], dict[str, int], dict[str, int]]:
    """From a COCO annotation file: (each image file found on disk -> its id, each file_name -> its id, each
    category name -> its id); the files are looked for where a COCO folder keeps them (see `visrec.data.coco`)."""
    from ..data.coco import _load_json, find_image

    path = Path(annotations).expanduser()
    if not path.is_file():
        raise VisrecError(f"--annotations {path} does not exist", "give a COCO annotation file (instances_*.json)")
    d = _load_json(path)
    root = path.parent.parent if path.parent.name == "annotations" else path.parent
    located, by_name = {}, {}
    for im in d["images"]:
        name = str(im.get("file_name", ""))
        by_name[name] = im["id"]
        f = find_image(root, path, name)
        if f is not None:
            located[f.resolve()] = im["id"]
    return located, by_name, {str(c.get("name")): c.get("id") for c in d.get("categories") or []}


def image_ids_of(inputs: list[str | Path], annotation_files: list[Path]) -> tuple[list[int], int]:
    """Each input's image id in the annotation files (by the file itself, else by its path ending in a file_name
    of theirs), and how many were found there; inputs they do not name are numbered after the files' largest id,
    in order."""
    located, by_name = {}, {}
    for f in annotation_files:
        a, b, _ = annotated_images(f)
        located.update(a)
        by_name.update(b)
    ids: list[int | None] = []
    for item in inputs:
        p = Path(item).expanduser()
        found = located.get(p.resolve())
        if found is None:
            posix = p.as_posix()
            matches = [i for n, i in by_name.items() if posix == n or posix.endswith("/" + n.lstrip("/"))]
            found = matches[0] if len(set(matches)) == 1 else None
        ids.append(found)
    known = [i for i in ids if i is not None]
    nxt = max([i for i in (*by_name.values(), *located.values()) if isinstance(i, int)] + [0]) + 1
    out = []
    for i in ids:
        if i is None:
            i, nxt = nxt, nxt + 1
        out.append(i)
    return out, len(known)


def coco_results_for(run, preds: list[Prediction], inputs: list[str | Path], *, classes: list[str],
                     annotations: str | Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """(a detection run's predictions as a COCO results file, how its image ids were found): categories are the
    dataset's ids (`annotations`' by name, else the run's); each input's image id is the one `annotations` (an
    instances_*.json), else the run's own COCO folder, gives its file; inputs they do not name are numbered after
    their largest id."""
    from ..data.coco import annotation_files

    data = run.config.data.name
    if annotations is not None:
        files = [Path(annotations)]
        cats = annotated_images(annotations)[2]
        missing = [c for c in classes if c not in cats]
        if missing:
            raise VisrecError(f"--annotations {annotations} has no category named {', '.join(map(repr, missing))}",
                              f"the run's classes are {', '.join(classes)}: give the annotation file of its data")
        cats = {c: cats[c] for c in classes}
    else:
        root = Path(data.split(":", 1)[1]) if data.startswith("coco:") else None
        files = list(annotation_files(root).values()) if root is not None and (root / "annotations").is_dir() else []
        cats = run_category_ids(run, classes)
    ids, found = image_ids_of(inputs, files)
    where = ", ".join(str(f) for f in files)
    if not files:
        how = (f"the run's data ({data}) has no COCO annotation file; the {len(inputs)} input(s) are numbered 1.. in "
               "the order given (give --annotations FILE to use your own ids)")
    elif found < len(inputs):
        how = (f"{found} of {len(inputs)} input(s) found in {where}; the others are numbered after its largest id, "
               "in the order given")
    else:
        how = f"all {len(inputs)} input(s) found in {where}"
    return coco_results_of(preds, cats, ids), how
