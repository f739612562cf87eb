"""Pose estimation: K named keypoints of the one object in an image (the course's extension of localization:
"treat localization as regression ... used in many other problems like human pose estimation").

Two heads, chosen by the model's output:
- regression: any classifier's head widened to 2K numbers, the keypoints' (x, y) as fractions of the image
  (Toshev and Szegedy's DeepPose);
- heatmaps: a dense model (`unet`) with K output channels, one map per keypoint, read by a soft-argmax (the
  expected position under the map's spatial softmax: Sun et al.'s integral regression), so the same coordinate
  loss trains it end to end.

The loss is smooth-L1 on the normalized coordinates of the visible keypoints (COCO's visibility flag v > 0; v = 0
counts nowhere). Metrics: PCK@0.1 and PCK@0.2 (the share of visible keypoints within 0.1 / 0.2 of the object box's
longer side of the truth) and `oks_ap`, COCO's keypoint AP (OKS-based, pycocotools' own evaluation). Training flips
images itself, swapping the keypoints whose names say left_ and right_, so the task's recipe leaves data.augment to
photometric changes.

Data: a COCO folder whose annotations carry `keypoints` (instances_*.json or person_keypoints_*.json; the
category's `keypoints` names them, its `skeleton` joins them). `stickmen(out)` writes one with known joints:

    from visrec.tasks.keypoints import stickmen
    stickmen("stick", count=2000, size=64)
    visrec train coco:stick --task keypoints --model unet
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset, ImageSet, Normalizer
from ..errors import VisrecError
from ..evaluate import predict_logits
from ..io import atomic_folder, write_json
from ..prediction import Answer, Predictor, Prepared, png_bytes
from ..training.task import EvalSettings, Evaluation, Task

JOINTS = ("head", "neck", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
          "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
BONES = (("head", "neck"), ("neck", "left_shoulder"), ("neck", "right_shoulder"), ("left_shoulder", "left_elbow"),
         ("left_elbow", "left_wrist"), ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
         ("left_shoulder", "left_hip"), ("right_shoulder", "right_hip"), ("left_hip", "right_hip"),
         ("left_hip", "left_knee"), ("left_knee", "left_ankle"), ("right_hip", "right_knee"),
         ("right_knee", "right_ankle"))
# COCO's per-keypoint OKS constants (cocodataset.org keypoints evaluation); other names get their mean
COCO_SIGMAS = {"nose": .026, "left_eye": .025, "right_eye": .025, "left_ear": .035, "right_ear": .035,
               "left_shoulder": .079, "right_shoulder": .079, "left_elbow": .072, "right_elbow": .072,
               "left_wrist": .062, "right_wrist": .062, "left_hip": .107, "right_hip": .107, "left_knee": .087,
               "right_knee": .087, "left_ankle": .089, "right_ankle": .089}


# ---------------------------------------------------------------------------------------------------- data


def stickmen(out: str | Path, *, count: int = 2000, size: int = 64, seed: int = 0) -> Path:
    """A COCO keypoints folder of stick figures with known joints (train: `count`, val: count/10, test: count/5),
    one figure per image, facing the viewer (its left side on the image's right). Written whole or not at all;
    an existing folder is returned as it is."""
    from PIL import Image, ImageDraw

    dest = Path(out)
    if (dest / "annotations" / "instances_test.json").is_file():
        return dest
    if size < 24:
        raise VisrecError(f"stickmen size {size} is too small for a figure", "use 32 or more")
    index = {n: i for i, n in enumerate(JOINTS)}
    category = {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(JOINTS),
                "skeleton": [[index[a] + 1, index[b] + 1] for a, b in BONES]}
    with atomic_folder(dest) as tmp:
        (tmp / "images").mkdir()
        for k, (split, n) in enumerate((("train", count), ("val", max(count // 10, 2)),
                                        ("test", max(count // 5, 2)))):
            rng = np.random.default_rng([seed, k])
            images, anns = [], []
            for i in range(n):
                canvas = (rng.random((size, size)) * 60 + rng.random() * 60).astype(np.uint8)
                im = Image.fromarray(canvas, "L")
                pts = _figure(rng, size)
                d = ImageDraw.Draw(im)
                width = max(1, size // 32)
                for a, b in BONES:
                    d.line([tuple(pts[index[a]]), tuple(pts[index[b]])], fill=230, width=width)
                hx, hy = pts[index["head"]]
                r = size * 0.04
                d.ellipse([hx - r, hy - r, hx + r, hy + r], outline=230, width=width)
                name = f"{split}_{i:06d}.png"
                im.save(tmp / "images" / name, optimize=False, compress_level=1)
                inside = (pts[:, 0] >= 0) & (pts[:, 0] < size) & (pts[:, 1] >= 0) & (pts[:, 1] < size)
                kps = [[round(float(x), 2), round(float(y), 2), 2 if ok else 0]
                       for (x, y), ok in zip(pts, inside, strict=True)]
                seen = pts[inside]
                x0, y0 = np.clip(seen.min(0) - size * 0.04, 0, size)
                x1, y1 = np.clip(seen.max(0) + size * 0.04, 0, size)
                images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
                anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                             "area": float((x1 - x0) * (y1 - y0)), "num_keypoints": int(inside.sum()),
                             "keypoints": [v for kp in kps for v in kp]})
            write_json(tmp / "annotations" / f"instances_{split}.json",
                       {"info": {"description": "visrec stickmen"}, "images": images, "annotations": anns,
                        "categories": [category]})
    return dest


def _figure(rng: np.random.Generator, size: int) -> np.ndarray:
    """(len(JOINTS), 2) pixel positions of one stick figure: random height, place, lean and limb angles."""
    h = size * rng.uniform(0.55, 0.85)
    cx, top = rng.uniform(0.3, 0.7) * size, rng.uniform(0.05, 0.95) * (size - h)
    lean = rng.uniform(-0.15, 0.15)
    neck = np.array([cx, top + 0.16 * h])
    head = neck + [lean * 0.1 * h, -0.11 * h]
    pelvis = neck + [lean * 0.45 * h, 0.38 * h]
    sh = 0.14 * h
    joints = {"head": head, "neck": neck, "left_shoulder": neck + [sh, 0.03 * h],
              "right_shoulder": neck + [-sh, 0.03 * h], "left_hip": pelvis + [0.08 * h, 0],
              "right_hip": pelvis + [-0.08 * h, 0]}
    for side, sign in (("left", 1), ("right", -1)):  # the figure's left is the viewer's right
        a1 = rng.uniform(-0.4, 1.9)  # arm angles from hanging down, outward positive
        a2 = a1 + rng.uniform(-1.2, 1.2)
        elbow = joints[f"{side}_shoulder"] + 0.2 * h * np.array([sign * math.sin(a1), math.cos(a1)])
        joints[f"{side}_elbow"] = elbow
        joints[f"{side}_wrist"] = elbow + 0.18 * h * np.array([sign * math.sin(a2), math.cos(a2)])
        l1 = rng.uniform(-0.2, 0.7)
        l2 = l1 + rng.uniform(-0.8, 0.2)
        knee = joints[f"{side}_hip"] + 0.24 * h * np.array([sign * math.sin(l1), math.cos(l1)])
        joints[f"{side}_knee"] = knee
        joints[f"{side}_ankle"] = knee + 0.23 * h * np.array([sign * math.sin(l2), math.cos(l2)])
    return np.array([joints[n] for n in JOINTS], dtype=np.float64)


def keypoint_schema(data_name: str, k: int) -> tuple[list[str], list[list[int]]]:
    """(the keypoints' names, the skeleton's 1-based pairs) from the category of a COCO folder's training file that
    names them; names kp1..kpK and no skeleton when none does."""
    from ..data.coco import _load_json, annotation_files

    if data_name.startswith("coco:"):
        try:
            doc = _load_json(annotation_files(Path(data_name.split(":", 1)[1]).expanduser())["train"])
        except VisrecError:
            doc = {}
        for c in doc.get("categories") or []:
            names = c.get("keypoints") or []
            if len(names) == k:
                return [str(n) for n in names], [list(map(int, p)) for p in c.get("skeleton") or []]
    return [f"kp{i + 1}" for i in range(k)], []


def flip_order(names: list[str]) -> torch.Tensor:
    """The permutation that swaps each left_/right_ (or l_/r_) keypoint with its mirror, for horizontal flips."""
    index = {n: i for i, n in enumerate(names)}
    order = []
    for n in names:
        for a, b in (("left", "right"), ("right", "left"), ("l_", "r_"), ("r_", "l_")):
            if a in n and n.replace(a, b) in index:
                order.append(index[n.replace(a, b)])
                break
        else:
            order.append(index[n])
    return torch.tensor(order)


# ---------------------------------------------------------------------------------------------------- answers


@dataclass
class Pose(Answer):
    """Each keypoint's name, place (x, y in the input's own pixels) and confidence (heatmaps: the map's peak
    share; regression: 1), with the skeleton that joins them."""

    points: list[dict[str, Any]]
    skeleton: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"keypoints": self.points, "skeleton": self.skeleton}

    def text(self) -> str:
        return ", ".join(f"{p['name']} ({round(p['x'])}, {round(p['y'])})" for p in self.points)

    def draw(self, item: Prepared) -> bytes:
        """The input (enlarged to 256 pixels on its longer side when smaller) with the skeleton in green and the
        keypoints: left ones red, right ones blue, the others yellow."""
        from PIL import Image, ImageDraw

        im = item.original()
        k = max(1.0, 256 / max(im.size))
        if k > 1:
            im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.NEAREST)
        pts = [(p["x"] * k, p["y"] * k) for p in self.points]
        d = ImageDraw.Draw(im)
        w = max(1, round(im.width / 80))
        for a, b in self.skeleton:
            d.line([pts[a - 1], pts[b - 1]], fill=(46, 204, 113), width=w)
        for p, (x, y) in zip(self.points, pts, strict=True):
            r = 1.5 * w
            color = (231, 76, 60) if "left" in p["name"] else (52, 152, 219) if "right" in p["name"] else (241, 196,
                                                                                                          15)
            d.ellipse([x - r, y - r, x + r, y + r], fill=color)
        return png_bytes(np.asarray(im))


class KeypointsPredictor(Predictor):
    draws = True

    def setup(self) -> None:
        self.names, self.skeleton = keypoint_schema(self.cfg.data.name, _outputs_k(self))

    def answer(self, items: list[Prepared], outputs: torch.Tensor, top_k: list[int]) -> list[Answer]:
        xy, conf = decode_outputs(outputs.float())
        res: list[Answer] = []
        for p, pts, cs in zip(items, xy, conf, strict=True):
            fw, fh = self.upload_scale(p)
            res.append(Pose([{"name": n, "x": round(float(x) * fw, 2), "y": round(float(y) * fh, 2),
                              "score": round(float(c), 4)} for n, (x, y), c in zip(self.names, pts, cs, strict=True)],
                            self.skeleton))
        return res


def _outputs_k(p: KeypointsPredictor) -> int:
    """K from one forward of the model (its output's channels, or half its width)."""
    x = torch.zeros(1, p.channels, *p.size, dtype=torch.uint8)
    with torch.inference_mode():
        out = p.forward(x)
    return int(out.shape[1]) if out.dim() == 4 else int(out.shape[1]) // 2


def decode_outputs(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xy (B, K, 2) as fractions of the image, confidence (B, K)) from a regression head (B, 2K) or heatmaps
    (B, K, H, W) read by soft-argmax (each pixel's centre, weighted by the map's spatial softmax)."""
    if out.dim() == 4:
        b, k, h, w = out.shape
        p = out.flatten(2).softmax(-1).view(b, k, h, w)
        xs = (torch.arange(w, device=out.device, dtype=out.dtype) + 0.5) / w
        ys = (torch.arange(h, device=out.device, dtype=out.dtype) + 0.5) / h
        x = (p.sum(2) * xs).sum(-1)
        y = (p.sum(3) * ys).sum(-1)
        return torch.stack([x, y], -1), p.flatten(2).amax(-1)
    xy = out.view(len(out), -1, 2).sigmoid()
    return xy, torch.ones(xy.shape[:2], device=out.device)


# ---------------------------------------------------------------------------------------------------- the task


class KeypointsTask(Task):
    name = "keypoints"
    Predictor = KeypointsPredictor
    random_crops = False  # targets in the images' pixels: images read whole
    target = "keypoints"
    primary = "oks_ap"
    maximize = True
    stats = ("pck02",)
    overfit_metric = "pck02"
    # the task flips images itself (swapping left and right keypoints): no geometric augmentation in the pipeline;
    # Adam, a U-Net's heatmaps read by soft-argmax
    recipe = {"model.name": "unet", "data.augment": [], "optim.name": "adam", "optim.lr": 2e-3,
              "optim.weight_decay": 0.0, "schedule.name": "cosine", "train.batch_size": 32, "train.epochs": 15,
              "eval.tta": "none", "loss.label_smoothing": 0.0}
    MOVES = ("hflip", "vflip", "crop", "translate", "scale", "rotate", "affine", "cutmix", "mixup", "randaugment",
             "trivialaugment", "autoaugment")

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.k = 0
        self.names: list[str] = []
        self.skeleton: list[list[int]] = []
        self.swap = torch.zeros(0, dtype=torch.long)

    # ---------------------------------------------------------------- data and model

    def check(self, ds: Dataset) -> None:
        moves = [a for a in self.cfg.data.augment if a.split(":", 1)[0] in self.MOVES]
        if moves:
            raise VisrecError(f"data.augment has {', '.join(moves)}, which move pixels but not keypoints",
                              "leave data.augment to photometric changes (the keypoints task flips images itself, "
                              "swapping left and right keypoints), e.g. --set data.augment=[]")
        for split, data in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
            if data is None:
                continue
            t = data.targets or {}
            if "keypoints" not in t:
                raise VisrecError(f"task keypoints needs keypoint annotations, and {ds.name} has none in its {split} "
                                  "split", "give a COCO folder whose annotations carry `keypoints` (e.g. "
                                  "visrec.tasks.keypoints.stickmen(FOLDER), then coco:FOLDER)")
        self.k = int(ds.train.targets["keypoints"].shape[2])
        self.names, self.skeleton = keypoint_schema(self.cfg.data.name, self.k)
        self.swap = flip_order(self.names)

    def num_outputs(self, ds: Dataset) -> int:
        self.k = int(ds.train.targets["keypoints"].shape[2])
        return self.k if self._dense() else 2 * self.k

    def _dense(self) -> bool:
        from ..models import model_entry

        try:
            return model_entry(self.cfg.model.name).family in ("segmentation", "unet")
        except Exception:  # noqa: BLE001 - a file model: a regression head unless it says otherwise
            return False

    def targets(self, data: ImageSet) -> dict[str, torch.Tensor]:
        t = data.targets
        kp = t["keypoints"].float()  # (N, M, K, 3)
        pick = (kp[..., 2] > 0).sum(-1).argmax(1)  # the object with the most visible keypoints
        rows = torch.arange(len(pick))
        h, w = data.images.shape[-2:]
        box = t["boxes"][rows, pick].float()
        return {"keypoints": kp[rows, pick], "box": box,
                "size": torch.tensor([float(w), float(h)]).expand(len(pick), 2).clone()}

    # ---------------------------------------------------------------- training

    def train_step(self, xb: torch.Tensor, yb: Any, ctx) -> tuple[Any, torch.Tensor, Any, bool]:
        """The loop's step on a batch whose images are mirrored at random (half of them), their keypoints with
        them: x -> width - x, left and right swapped."""
        x, target = ctx.inputs(xb, yb)
        flip = torch.rand(len(x), device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        kp = target["keypoints"]
        mirrored = kp[:, self.swap.to(kp.device)].clone()
        mirrored[..., 0] = target["size"][:, None, 0] - mirrored[..., 0]
        target = {**target, "keypoints": torch.where(flip.view(-1, 1, 1), mirrored, kp)}
        with ctx.autocast():
            out = ctx.net(x)
        loss = self.loss(out, target)
        return out, loss, target, ctx.update(loss)

    def _truth(self, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        kp = targets["keypoints"]
        return kp[..., :2] / targets["size"][:, None, :], (kp[..., 2] > 0).float()

    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        true, vis = self._truth(targets)
        xy, _ = decode_outputs(outputs.float())
        per = F.smooth_l1_loss(xy, true, reduction="none", beta=0.02).sum(-1)
        return (per * vis).sum() / vis.sum().clamp_min(1)

    def batch_stats(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        return self._pck(outputs, targets, 0.2)[0].sum().view(1)

    def _pck(self, outputs: torch.Tensor, targets: dict[str, torch.Tensor], alpha: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per image, the share of its visible keypoints within alpha x the box's longer side; whether it has
        any)."""
        xy, _ = decode_outputs(outputs.float())
        xy = xy * targets["size"][:, None, :]
        kp = targets["keypoints"]
        vis = (kp[..., 2] > 0).float()
        box = targets["box"]
        scale = (box[:, 2:] - box[:, :2]).amax(1).clamp_min(1.0)
        near = ((xy - kp[..., :2]).norm(dim=-1) <= alpha * scale[:, None]).float()
        n = vis.sum(1)
        return (near * vis).sum(1) / n.clamp_min(1), n > 0

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> Evaluation:
        targets = self.targets(data)
        out = predict_logits(model, data.images, normalizer, batch_size=settings.batch_size,
                             channels_last=settings.channels_last, amp_dtype=settings.amp_dtype).cpu()
        metrics: dict[str, float] = {"loss": float(self.loss(out, targets)) if len(out) else float("nan")}
        for alpha, key in ((0.1, "pck01"), (0.2, "pck02")):
            share, has = self._pck(out, targets, alpha) if len(out) else (torch.zeros(0), torch.zeros(0).bool())
            metrics[key] = float(share[has].mean()) if bool(has.any()) else float("nan")
        metrics["oks_ap"], metrics["oks_ap50"] = self.oks_ap(out, targets)
        return Evaluation(split, metrics)

    def sigmas(self) -> np.ndarray:
        mean = float(np.mean(list(COCO_SIGMAS.values())))
        return np.array([COCO_SIGMAS.get(n, mean) for n in self.names], dtype=np.float64)

    def oks_ap(self, outputs: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[float, float]:
        """COCO's keypoint AP and AP@OKS.5 by pycocotools, one object per image: the truth's area is its box's, each
        prediction scored by its mean keypoint confidence."""
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not len(outputs):
            return float("nan"), float("nan")
        xy, conf = decode_outputs(outputs.float())
        xy = xy * targets["size"][:, None, :]
        kp, box = targets["keypoints"], targets["box"]
        images, anns, results = [], [], []
        for i in range(len(kp)):
            w, h = (float(v) for v in targets["size"][i])
            x0, y0, x1, y1 = (float(v) for v in box[i])
            vis = kp[i, :, 2] > 0
            images.append({"id": i + 1, "width": w, "height": h})
            if bool(vis.any()):
                anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": max((x1 - x0) * (y1 - y0), 1.0),
                             "num_keypoints": int(vis.sum()),
                             "keypoints": [float(v) for row in kp[i].tolist() for v in row]})
            pts = torch.cat([xy[i], torch.ones(len(xy[i]), 1)], 1)
            results.append({"image_id": i + 1, "category_id": 1, "keypoints": pts.flatten().tolist(),
                            "score": float(conf[i].mean())})
        if not anns:
            return float("nan"), float("nan")
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": 1, "name": "object", "keypoints": self.names,
                                      "skeleton": self.skeleton}]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, "keypoints")
            ev.params.kpt_oks_sigmas = self.sigmas()
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return float(ev.stats[0]), float(ev.stats[1])

    def at_chance(self, test: Evaluation, ds: Dataset) -> str | None:
        if test.metrics.get("pck02", 1.0) <= 0.05:
            return f"almost no test keypoint was found (PCK@0.2 {test.metrics['pck02']:.1%})"
        return None

    def summary_fields(self, test: Evaluation | None) -> dict[str, Any]:
        return {"keypoints": self.names, "head": "heatmaps" if self._dense() else "regression"}

    @torch.no_grad()
    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 8,
                folder: Path | None = None) -> dict[str, bytes]:
        from ..plotting import figure_png
        from .draw import image_grid

        found = self.examples(model, data, normalizer, n)
        if found is None:
            return {}
        x8, out, targets = found
        xy = decode_outputs(out.float())[0] * targets["size"][:, None, :]
        fig, axes = image_grid(x8)
        for i in range(len(x8)):
            ax = axes.flat[i]
            for pts, color, style in ((targets["keypoints"][i, :, :2], "#27ae60", "-"), (xy[i], "#c0392b", "--")):
                for a, b in self.skeleton:
                    ax.plot([pts[a - 1, 0], pts[b - 1, 0]], [pts[a - 1, 1], pts[b - 1, 1]], color=color, lw=1,
                            ls=style)
                ax.scatter(pts[:, 0], pts[:, 1], s=6, color=color)
        return {"Test images: true keypoints (green) and predicted ones (red, dashed)": figure_png(fig, dpi=100)}


__all__ = ["JOINTS", "KeypointsTask", "Pose", "decode_outputs", "flip_order", "keypoint_schema", "stickmen"]
