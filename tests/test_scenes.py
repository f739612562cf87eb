"""Scenes, COCO and YOLO folders: targets beyond one label, read as users have them, with errors that name the
file, the id and the fix; geometric augmentation moves boxes and masks with their pixels."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.data import load_dataset
from visrec.data.augment import Crop, HFlip, VFlip
from visrec.data.coco import NO_OBJECT, validate_coco
from visrec.data.scenes import _objects, generate_scenes
from visrec.data.yolo import validate_yolo
from visrec.errors import VisrecError


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
    """60 training scenes of digits, written once as a COCO folder."""
    return generate_scenes("scenes:digits", count=60, size=48, max_objects=3, seed=0,
                           out=tmp_path_factory.mktemp("scenes") / "coco")


def test_scenes_have_boxes_masks_and_captions_that_agree(scenes_dir):
    ds = load_dataset(f"coco:{scenes_dir}", val_fraction=0.1)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (60, 6, 12)  # official val and test
    assert ds.image_size == (48, 48) and ds.classes == [str(i) for i in range(10)]
    t = ds.train.targets
    boxes, labels, inst = t["boxes"], t["box_labels"], t["instances"]
    assert boxes.shape[1] <= 3 and (boxes >= 0).all() and (boxes <= 48).all()
    for i in range(len(ds.train)):
        objs = (labels[i] >= 0).nonzero().flatten().tolist()
        assert 1 <= len(objs) <= 3
        areas = []
        for k in objs:  # every box is the bounding box of its visible mask
            ys, xs = (inst[i] == k + 1).nonzero(as_tuple=True)
            assert boxes[i, k].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            areas.append(float((boxes[i, k, 2] - boxes[i, k, 0]) * (boxes[i, k, 3] - boxes[i, k, 1])))
        assert ds.train.labels[i] == labels[i, objs[int(np.argmax(areas))]]  # the largest object's class
        words = t["captions"][i][0].split()
        assert sum(w in ds.classes for w in words) == len(objs)  # the caption names every object once


def test_train_and_test_scenes_draw_from_disjoint_objects():
    objects, classes = _objects("digits")
    train = {tuple(x.flatten().tolist()) for x in objects["train"][0]}
    test = [tuple(x.flatten().tolist()) for x in objects["test"][0]]
    assert classes == [str(i) for i in range(10)] and len(test) > 300
    assert sum(x in train for x in test) < 5  # digits has a few duplicate images; nothing is shared by design


def test_scenes_are_cached_seeded_and_atomic(tmp_path):
    a = generate_scenes("scenes:digits", count=12, size=32, max_objects=2, out=tmp_path / "a")
    b = generate_scenes("scenes:digits", count=12, size=32, max_objects=2, out=tmp_path / "b")
    assert (a / "annotations/instances_train.json").read_text() == (b / "annotations/instances_train.json").read_text()
    assert not list(tmp_path.glob(".scenes-*"))  # no half-written folder left behind
    mtime = (a / "annotations/instances_test.json").stat().st_mtime
    generate_scenes("scenes:digits", count=12, size=32, max_objects=2, out=a)
    assert (a / "annotations/instances_test.json").stat().st_mtime == mtime  # read from the cache
    with pytest.raises(VisrecError, match="scene object source"):
        generate_scenes("scenes:cifar", count=12)


def _coco(tmp_path, images, anns, cats, split="train"):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for im in images:
        if not im.pop("_missing", False):
            Image.fromarray(np.full((im["height"], im["width"]), 50, np.uint8)).save(root / "images" / im["file_name"])
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _img(i, w=20, h=16):
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def test_a_users_coco_folder_category_zero_polygons_and_negatives(tmp_path):
    cats = [{"id": 0, "name": "cat"}, {"id": 7, "name": "dog"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 2, "image_id": 1, "category_id": 0, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0,
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
            {"id": 3, "image_id": 2, "category_id": 0, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0,
             "segmentation": []}]
    root = _coco(tmp_path, [_img(1), _img(2), _img(3), _img(4)], anns, cats)
    ds = load_dataset(f"coco:{root}", val_fraction=0, test_fraction=0.25)
    assert ds.classes == ["cat", "dog", NO_OBJECT]  # id 0 is a category; images 3 and 4 are negatives
    everything = {len(s): s for s in (ds.train, ds.test)}
    assert sum(everything) == 4
    both = visrec.ImageSet(torch.cat([ds.train.images, ds.test.images]), torch.cat([ds.train.labels, ds.test.labels]),
                           ds.classes)
    assert sorted(both.labels.tolist()) == [0, 1, 2, 2]  # image 1: the dog is largest; image 2: cat
    first = [s for s in (ds.train, ds.test) if (s.labels == 1).any()][0]
    i = int((first.labels == 1).nonzero()[0])
    assert first.targets["boxes"][i, 0].tolist() == [2.0, 3.0, 12.0, 11.0]
    assert int((first.targets["instances"][i] == 1).sum()) > 50  # the polygon's mask, decoded by pycocotools


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda im, an, ca: im[0].update(_missing=True), "image 1: file '1.png' not found"),
    (lambda im, an, ca: an[0].update(bbox=[15, 2, 10, 4]), "annotation 1 (image 1): bbox [15, 2, 10, 4] lies outside"),
    (lambda im, an, ca: an[0].update(category_id=5), "annotation 1 (image 1): unknown category_id 5"),
    (lambda im, an, ca: an.append(dict(an[0])), "annotation 1 (image 1): duplicate annotation id"),
    (lambda im, an, ca: im.append(_img(1)), "image 1: duplicate image id"),
    (lambda im, an, ca: an[0].update(segmentation=[[1, 1, 5, 5]]), "a polygon with 2 points"),
    (lambda im, an, ca: an[0].update(segmentation={"size": [8, 8], "counts": "0"}),
     "RLE mask of size [8, 8] on a 20x16"),
])
def test_coco_problems_name_the_file_the_id_and_the_fix(tmp_path, mutate, message):
    images, anns = [_img(1), _img(2)], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 5, 4],
                                          "iscrowd": 0, "segmentation": []}]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    mutate(images, anns, cats)
    root = _coco(tmp_path, images, anns, cats)
    problems = [str(p) for p in validate_coco(root) if p.severity == "error"]
    assert any(message in p and "instances_train.json" in p for p in problems), problems
    with pytest.raises(VisrecError, match="visrec validate coco:"):
        load_dataset(f"coco:{root}")
    r = CliRunner().invoke(app, ["validate", f"coco:{root}"])
    assert r.exit_code == 1 and message.split(":")[0] in r.output


def test_zero_size_boxes_are_left_out_and_crowd_regions_are_ignored(tmp_path):
    from visrec.tasks.detection import coco_evaluate, coco_ground_truth, coco_results, to_torchvision

    # as in COCO 2017's own train file: a box of height 0 (left out), and a crowd region (ignored)
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 6, 5], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 2, 8, 12], "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [3, 3, 5, 0], "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [2, 2, 4, 4], "iscrowd": 0}]
    root = _coco(tmp_path, [_img(1), _img(2)], anns, [{"id": 1, "name": "a"}])
    found = {p.severity: str(p) for p in validate_coco(root)}
    assert "error" not in found and "annotation 3 (image 2)" in found["warning"] and "crowd" in found["note"]
    ds = load_dataset(f"coco:{root}", val_fraction=0, test_fraction=0.5, split_seed=0)
    both = visrec.ImageSet(torch.cat([ds.train.images, ds.test.images]), torch.cat([ds.train.labels, ds.test.labels]),
                           ds.classes, targets={k: torch.cat([ds.train.targets[k], ds.test.targets[k]])
                                                for k in ("boxes", "box_labels", "crowd")})
    first = int((both.targets["crowd"].any(1)).nonzero()[0])  # the image with the crowd region
    assert (both.targets["box_labels"] >= 0).sum().item() == 3  # the zero-height box is gone
    tv = to_torchvision(both.targets, masks=False)
    assert len(tv[first]["boxes"]) == 1  # the crowd region is not an object to learn
    gt = coco_ground_truth(both, ["a"], masks=False)
    assert sorted(a["iscrowd"] for a in gt["annotations"]) == [0, 0, 1]
    # COCO's scoring: missing the crowd costs nothing (it is no object), and a box on it is no false positive
    real = (both.targets["box_labels"] >= 0) & ~both.targets["crowd"]
    for on_crowd in (False, True):
        dets = []
        for i in range(2):
            boxes = both.targets["boxes"][i][real[i] | (on_crowd & both.targets["crowd"][i])]
            scores = torch.linspace(0.8, 0.7, len(boxes))
            if on_crowd and i == first:
                scores[both.targets["crowd"][i][both.targets["box_labels"][i] >= 0]] = 0.99  # the top score
            dets.append({"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long), "scores": scores})
        metrics, _ = coco_evaluate(gt, coco_results(dets), "bbox")
        assert metrics["map50"] == pytest.approx(1.0), on_crowd


def _yolo(tmp_path, lines: dict[str, str]):
    root = tmp_path / "y"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((10, 20, 3), 90 + k, np.uint8)).save(root / "images" / split / f"{k}.jpg")
    for name, text in lines.items():
        (root / "labels" / name).write_text(text)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val",
                                                    "names": {0: "ball", 1: "bat"}}))
    return root


def test_yolo_folder_reads_boxes_in_pixels_and_keeps_negatives(tmp_path):
    root = _yolo(tmp_path, {"train/0.txt": "1 0.5 0.5 0.5 0.4\n0 0.1 0.1 0.1 0.2\n", "val/1.txt": "0 0.5 0.5 1 1\n"})
    ds = load_dataset(f"yolo:{root}", val_fraction=0)
    assert ds.classes == ["ball", "bat", NO_OBJECT] and ds.channels == 3 and len(ds.test) == 2  # val is the test
    i = int((ds.train.labels == 1).nonzero()[0])
    assert ds.train.targets["boxes"][i, 0].tolist() == pytest.approx([5.0, 3.0, 15.0, 7.0])  # 20x10 image
    assert ds.train.labels.tolist().count(2) == 1  # 1.jpg has no label file: a negative
    for size in (None, 16):  # streamed (the files read when needed, letterboxed alike): the same images and boxes
        eager = load_dataset(f"yolo:{root}", val_fraction=0, image_size=size)
        lazy = load_dataset(f"yolo:{root}", val_fraction=0, image_size=size, cache="none")
        assert lazy.streamed and torch.equal(lazy.train.images[:], eager.train.images)
        assert torch.equal(lazy.train.targets["boxes"], eager.train.targets["boxes"])


@pytest.mark.parametrize(("text", "message"), [
    ("0 0.5 0.5 0.2\n", "line 1: 4 fields"),
    ("0 0.5 1.5 0.2 0.2\n", "line 1: values [0.5, 1.5, 0.2, 0.2] are outside [0, 1]"),
    ("3 0.5 0.5 0.2 0.2\n", "line 1: class 3 is not in 0..1"),
])
def test_yolo_problems_name_the_file_and_line(tmp_path, text, message):
    root = _yolo(tmp_path, {"train/0.txt": text})
    problems = [str(p) for p in validate_yolo(root)]
    assert any(message in p and p.startswith(str(root / "labels/train/0.txt")) for p in problems), problems
    with pytest.raises(VisrecError, match="visrec validate yolo:"):
        load_dataset(f"yolo:{root}")


def test_a_yolo_box_of_zero_size_is_left_out_with_a_warning(tmp_path):
    root = _yolo(tmp_path, {"train/0.txt": "1 0.5 0.5 0.5 0.4\n0 0.2 0.2 0 0.1\n"})
    found = [(p.severity, p.where) for p in validate_yolo(root)]
    assert found == [("warning", "line 2")]
    ds = load_dataset(f"yolo:{root}", val_fraction=0)
    assert int((ds.train.targets["box_labels"] >= 0).sum()) == 1


def test_flips_and_crops_move_boxes_and_masks_with_the_pixels():
    x = torch.zeros(6, 1, 10, 12)
    x[:, :, 2:5, 1:4] = 1
    y = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]).repeat(6, 1, 1), "box_labels": torch.full((6, 1), 4),
         "instances": (x[:, 0] > 0).to(torch.uint8)}
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for aug in (HFlip(), VFlip(), Crop(3), Crop(12)):
        xo, yo = aug(x, y, gen, rng)
        for i in range(6):
            ys, xs = (xo[i, 0] > 0).nonzero(as_tuple=True)
            assert torch.equal(yo["instances"][i].bool(), xo[i, 0] > 0)
            if len(xs):
                assert yo["boxes"][i, 0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert yo["box_labels"][i, 0] == 4
            else:  # the object left the image: its box is dropped
                assert yo["box_labels"][i, 0] == -1
    with pytest.raises(VisrecError, match="do not apply to boxes"):
        visrec.data.Pipeline(["mixup"])(x, y)


def test_train_scenes_classifies_the_largest_object(scenes_dir, tmp_path):
    shutil.copytree(scenes_dir, tmp_path / "mine")
    r = CliRunner().invoke(app, ["train", f"coco:{tmp_path / 'mine'}", "--model", "lenet5", "--epochs", "2",
                                 "--set", "train.batch_size=16", "--set", "log.report=false", "--out", "runs/s",
                                 "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{"):])
    assert s["status"] == "completed" and s["n_train"] == 60 and s["num_classes"] == 10
    assert 0.0 <= s["test_acc"] <= 1.0


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.6, 2.0])
def test_scale_jitter_moves_boxes_and_masks_with_the_pixels(factor):
    from visrec.data.augment import parse_augmentation

    x = torch.zeros(3, 1, 20, 20)
    x[:, :, 6:12, 4:10] = 1.0  # an object at x 4..10, y 6..12
    inst = (x[:, 0] > 0).to(torch.uint8)
    y = {"boxes": torch.tensor([[[4.0, 6.0, 10.0, 12.0]]]).repeat(3, 1, 1), "box_labels": torch.zeros(3, 1).long(),
         "instances": inst}
    aug = parse_augmentation(f"scale:{factor},{factor}")
    out, t = aug(x, y, torch.Generator().manual_seed(0), np.random.default_rng(1))
    assert out.shape == x.shape and t["instances"].shape == inst.shape
    for i in range(3):
        if int(t["box_labels"][i, 0]) < 0:  # cut off entirely (zoomed in far from it): nothing left there
            assert not t["instances"][i].any()
            continue
        x0, y0, x1, y1 = (round(v) for v in t["boxes"][i, 0].tolist())
        inside = out[i, 0, y0:y1, x0:x1]
        assert inside.numel() and float(inside.mean()) > 0.5  # the box is where the object's pixels went
        around = out[i, 0, max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1]  # a pixel more: a downscale blurs the edges
        assert float(out[i, 0].sum()) == pytest.approx(float(around.sum()), rel=0.02)
        assert bool(t["instances"][i, y0:y1, x0:x1].any()) and not t["instances"][i, :, x1 + 1:].any()


def test_a_packed_yolo_folder_reads_as_the_folder(tmp_path):
    from visrec.data.shards import pack

    root = _yolo(tmp_path, {"train/0.txt": "1 0.5 0.5 0.5 0.4\n0 0.1 0.1 0.1 0.2\n", "val/1.txt": "0 0.5 0.5 1 1\n"})
    pack(f"yolo:{root}", str(tmp_path / "shards"), "1MB")
    a = load_dataset(f"yolo:{root}", val_fraction=0, image_size=16)
    b = load_dataset(f"wds:{tmp_path / 'shards'}", val_fraction=0, image_size=16)
    assert a.classes == b.classes and torch.equal(a.train.images, b.train.images)
    assert torch.allclose(a.train.targets["boxes"], b.train.targets["boxes"], atol=1e-4)
    assert b.train.category_ids == a.train.category_ids == [0, 1]
