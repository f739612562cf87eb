"""Object detection and instance segmentation: COCO metrics from pycocotools (perfect, shifted, empty, negatives),
torchvision's detectors on zoo backbones with sizes fitted to the data, every detector trained end to end through
the common loop, the results file scored again by pycocotools, predict with boxes, masks and COCO output, and
bad input named."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.config import resolve_config
from visrec.data import ImageSet
from visrec.data.scenes import generate_scenes
from visrec.errors import VisrecError
from visrec.models import create_model
from visrec.models.detect import anchors_for_strides
from visrec.runs import Run
from visrec.tasks import create_task
from visrec.tasks.detection import coco_evaluate, coco_ground_truth, coco_results, fit_sizes, to_torchvision

TINY = {"fpn_channels": 32, "head_size": 32, "stem": "imagenet"}
SMALL_INPUT = {**TINY, "min_size": 48}  # trained end to end: the fitted 4x upscaling of 32-pixel scenes is slow
FAST = {"train.batch_size": 8, "train.min_epoch_steps": 0, "log.every": 4, "log.report": False}


def _images(boxes: list[list[list[float]]], labels: list[list[int]], size: int = 32) -> ImageSet:
    m = max(max(len(b) for b in boxes), 1)
    tb = torch.zeros(len(boxes), m, 4)
    tl = torch.full((len(boxes), m), -1)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        if b:
            tb[i, : len(b)] = torch.tensor(b)
            tl[i, : len(lab)] = torch.tensor(lab)
    x = torch.zeros(len(boxes), 1, size, size, dtype=torch.uint8)
    return ImageSet(x, torch.zeros(len(boxes), dtype=torch.long), ["a", "b"], targets={"boxes": tb, "box_labels": tl})


def _dets(boxes, labels, scores=None):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "labels": torch.tensor(labels).long(),
            "scores": torch.tensor(scores or [0.9] * len(labels), dtype=torch.float32)}


def test_a_perfect_detection_scores_one_a_shifted_one_less_and_none_zero():
    data = _images([[[2, 2, 14, 14], [16, 10, 30, 28]], [[4, 4, 20, 12]], []], [[0, 1], [1], []])
    gt = coco_ground_truth(data, ["a", "b"], masks=False)
    assert [a["bbox"] for a in gt["annotations"]][0] == [2, 2, 12, 12]  # COCO boxes are xywh
    perfect = [_dets([[2, 2, 14, 14], [16, 10, 30, 28]], [0, 1]), _dets([[4, 4, 20, 12]], [1]), _dets([], [])]
    m, _ = coco_evaluate(gt, coco_results(perfect))
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)
    shifted = [_dets([[4, 4, 16, 16], [16, 10, 30, 28]], [0, 1]), _dets([[4, 4, 20, 12]], [1]), _dets([], [])]
    m2, _ = coco_evaluate(gt, coco_results(shifted))
    assert m2["map"] < 1.0 and m2["map50"] == pytest.approx(1.0)  # IoU 0.53: right at 0.5, wrong above
    wrong_class = [_dets([[2, 2, 14, 14]], [1]), _dets([], []), _dets([], [])]
    assert coco_evaluate(gt, coco_results(wrong_class))[0]["map"] == 0.0
    none, precision = coco_evaluate(gt, [])
    assert none["map"] == 0.0 and precision is None
    # a false positive on the negative image costs precision
    extra = [*perfect[:2], _dets([[0, 0, 10, 10]], [0], [0.99])]
    assert coco_evaluate(gt, coco_results(extra))[0]["map"] < 1.0


def test_targets_drop_cut_away_and_sub_pixel_boxes():
    t = {"boxes": torch.tensor([[[1.0, 1, 9, 9], [5, 5, 5.5, 9], [0, 0, 0, 0]]]),
         "box_labels": torch.tensor([[2, 1, -1]]),
         "instances": torch.tensor([[[1, 1, 0], [0, 2, 2], [0, 0, 0]]], dtype=torch.uint8)}
    out = to_torchvision(t, masks=True)[0]
    assert out["labels"].tolist() == [2] and out["boxes"].shape == (1, 4)
    assert out["masks"].tolist() == [[[1, 1, 0], [0, 0, 0], [0, 0, 0]]]


def test_sizes_are_fitted_to_the_training_boxes():
    small = _images([[[0, 0, 8, 8]], [[10, 10, 22, 22]], [[0, 0, 6, 10]]] * 10, [[0], [1], [0]] * 10, size=64)
    fit = fit_sizes(small, "fasterrcnn")
    assert fit["min_size"] > 64  # 6-8 pixel objects are upscaled, not to torchvision's 800
    scale = fit["min_size"] / 64
    lo, hi = fit["object_sizes"]
    assert lo <= 7 * scale and hi >= 11 * scale
    assert 1.0 in fit["aspect_ratios"] and max(fit["aspect_ratios"]) > 1.5  # a third of the boxes are tall
    assert fit_sizes(small, "retinanet")["min_size"] > fit["min_size"]  # its finest level has twice the stride
    native = fit_sizes(small, "fasterrcnn", min_size=64)  # a size the user gave: object sizes at that scale
    assert native["min_size"] == 64 and native["object_sizes"][1] < hi
    big = _images([[[0, 0, 40, 40]]] * 4, [[0]] * 4, size=64)
    assert fit_sizes(big, "fasterrcnn")["min_size"] == 64
    # anchors: 4-8 strides wide per level, kept inside the objects' sizes
    sizes = anchors_for_strides([4, 8, 16, 32], [20, 60])
    assert sizes[0] == [20, 20.2, 25.4] and sizes[1][0] == 32 and sizes[3] == [60, 60, 60]


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v1", "retinanet_resnet18", "fcos_resnet18",
                                  "maskrcnn_resnet18"])
def test_detectors_train_and_detect_on_zoo_backbones(name):
    torch.manual_seed(0)
    m = create_model(name, in_chans=3, num_classes=3, image_size=48, **{**TINY, "stem": "small"})
    x = torch.rand(2, 3, 48, 48)
    masks = torch.zeros(1, 48, 48, dtype=torch.uint8)
    masks[0, 10:30, 5:25] = 1
    targets = [{"boxes": torch.tensor([[5.0, 10, 25, 30]]), "labels": torch.tensor([0]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 48, 48, dtype=torch.uint8)}]  # a negative image
    m.train()
    losses = m(x, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    m.eval()
    with torch.no_grad():
        out = m(x)
    assert len(out) == 2 and all(set(o) >= {"boxes", "labels", "scores"} for o in out)
    assert all(((o["labels"] >= 0) & (o["labels"] < 3)).all() for o in out)  # visrec's class indices
    assert ("masks" in out[0]) == name.startswith("maskrcnn")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes("scenes:digits", count=40, size=32, max_objects=2, seed=0,
                           out=tmp_path_factory.mktemp("det") / "coco")


@pytest.fixture(scope="module")
def instance_run(scenes, tmp_path_factory):
    """A Mask R-CNN trained a few steps: detection and instance outputs come from the same run."""
    out = tmp_path_factory.mktemp("runs") / "inst"
    return visrec.train(f"coco:{scenes}", model="maskrcnn_resnet18", task="instance", epochs=2, out=str(out),
                        progress=False, overrides={**FAST, "model.kwargs": SMALL_INPUT, "log.report": True})


def test_an_instance_run_trains_evaluates_and_writes_coco_files(instance_run):
    s = instance_run.summary
    assert s["status"] == "completed" and s["task"] == "instance" and s["primary_metric"] == "mask_map"
    for k in ("test_map", "test_map50", "test_ar100", "test_mask_map"):
        assert k in s and (math.isnan(s[k]) or 0 <= s[k] <= 1)
    kw = instance_run.config.model.kwargs
    assert {"object_sizes", "aspect_ratios"} <= set(kw) and kw["min_size"] == 48  # fitted, and given
    # pycocotools on the two files the run wrote gives the run's own numbers
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    path = instance_run.path
    results = json.loads((path / "predictions_test.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path / "ground_truth_test.json"))
        for iou_type, key in (("bbox", "test_map"), ("segm", "test_mask_map")):
            ev = COCOeval(gt, gt.loadRes(str(path / "predictions_test.json")), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            assert ev.stats[0] == pytest.approx(s[key], abs=1e-9)
    assert (path / "per_class_ap.csv").read_text().startswith("class,ap,ap50")
    html = (path / "report.html").read_text()
    assert "Test images: true boxes and masks" in html and "Precision-recall curves" in html
    # visrec eval gives the same numbers again
    res = CliRunner().invoke(app, ["eval", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["mask_map"] == pytest.approx(s["test_mask_map"], abs=1e-9)


def test_predict_draws_boxes_and_writes_coco_results(instance_run, tmp_path):
    img = tmp_path / "scene.png"
    x = instance_run.load_model().model  # any image size: the detector resizes it itself
    assert x is not None
    Image.fromarray((torch.rand(50, 70) * 255).byte().numpy(), "L").save(img)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(instance_run.path), str(img), "--format", "coco", "--min-score", "0",
                              "--draw", str(tmp_path / "drawn")])
    assert res.exit_code == 0, res.output
    coco = json.loads(res.stdout)
    assert all(len(r["bbox"]) == 4 and "segmentation" in r for r in coco)
    # an image the run's COCO folder does not know is numbered after the folder's largest image id
    assert len({r["image_id"] for r in coco}) == 1 and "0 of 1 input(s) found" in res.stderr
    assert (tmp_path / "drawn" / "scene.png").is_file()
    res = runner.invoke(app, ["predict", str(instance_run.path), str(img), str(tmp_path / "missing.png"), "--json",
                              "--min-score", "0"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc[0]["width"] == 70 and doc[0]["height"] == 50 and "does not exist" in doc[1]["error"]
    for o in doc[0]["objects"]:
        x0, y0, x1, y1 = o["box"]
        assert 0 <= x0 <= x1 <= 70 and 0 <= y0 <= y1 <= 50  # boxes in the input's own pixels


def test_a_served_instance_run_answers_with_objects_masks_and_no_onnx(instance_run):
    from visrec.serve.model import ServedModel

    m = ServedModel(instance_run.path, min_score=0.0).load()
    buf = io.BytesIO()
    Image.fromarray((torch.rand(50, 70) * 255).byte().numpy(), "L").save(buf, format="PNG")
    item = m.prepare(buf.getvalue(), "scene.png")
    assert (item.width, item.height) == (70, 50) and item.x.shape[-2:] == (50, 70)  # kept at its own size
    r = m.infer([item, item])[0]
    assert r["objects"] and all(o["class"] in m.classes and "mask" in o for o in r["objects"])
    for o in r["objects"]:
        x0, y0, x1, y1 = o["box"]
        assert 0 <= x0 <= x1 <= 70 and 0 <= y0 <= y1 <= 50
    overlay = Image.open(io.BytesIO(base64.b64decode(r["mask"].split(",", 1)[1])))
    assert overlay.size == (70, 50) and overlay.mode == "RGBA"
    with pytest.raises(VisrecError, match="(?s)onnx backend gives a network.s tensor output.*use --backend torch"):
        ServedModel(instance_run.path, backend="onnx")


def test_detection_runs_single_stage_models_and_resumes(scenes, tmp_path):
    cfg = resolve_config(None, {**FAST, "data.name": f"coco:{scenes}", "model.name": "retinanet_resnet18",
                                "task.name": "detection", "train.epochs": 2, "model.kwargs": SMALL_INPUT})
    run = visrec.Trainer(cfg, out="runs/ret", progress=False).fit(stop_after_steps=3)
    assert run.status == "interrupted"
    run = visrec.resume(run.path, progress=False)
    s = run.summary
    assert s["status"] == "completed" and s["primary_metric"] == "map" and s["steps"] == 2 * (s["n_train"] // 8)
    assert "test_mask_map" not in s and len(s["object_sizes"]) == 2
    res = CliRunner().invoke(app, ["runs", "runs"])
    assert res.exit_code == 0 and "ret" in res.output


def test_bad_input_is_named(scenes, tmp_path):
    det = create_task("detection", resolve_config(None, ["task.name=detection"]))
    with pytest.raises(VisrecError, match="needs boxes"):
        det.check(visrec.load_dataset("synthetic:classes=3,size=8,train=30,test=9"))
    ds = visrec.load_dataset(f"coco:{scenes}")
    det.check(ds)
    with pytest.raises(VisrecError, match="needs a detection model"):
        det.check_model(create_model("convnet", 1, 10, 32), ds)
    inst = create_task("instance", resolve_config(None, ["task.name=instance"]))
    inst.check(ds)
    with pytest.raises(VisrecError, match="mask head"):
        inst.check_model(create_model("fasterrcnn_resnet18", 1, 10, 32, **TINY), ds)
    cls = create_task("classification")
    with pytest.raises(VisrecError, match="is a detection model"):
        cls.check_model(create_model("fasterrcnn_resnet18", 1, 10, 32, **TINY), ds)
    # the detector's recipe is the task's default, and anything given overrides it
    cfg = resolve_config(None, ["task.name=detection", "optim.lr=0.005"])
    assert cfg.optim.name == "momentum" and cfg.optim.lr == 0.005 and cfg.train.batch_size == 16
    assert cfg.model.name == "fasterrcnn_resnet18"  # `--task detection` alone gets a detector
    assert resolve_config(None, ["task.name=instance"], options={"model.name": "maskrcnn_resnet50"}
                          ).model.name == "maskrcnn_resnet50"
    assert resolve_config(None, [], options={"task.name": "classification"}).optim.lr == 0.2


def test_format_coco_is_for_detection_runs(tmp_path):
    run = visrec.train("synthetic:classes=3,size=8,train=30,test=9", model="linear", epochs=1, out="runs/cls",
                       progress=False, overrides={**FAST, "model.kwargs": {}})
    img = tmp_path / "x.png"
    Image.fromarray((torch.rand(8, 8, 3) * 255).byte().numpy(), "RGB").save(img)
    res = CliRunner().invoke(app, ["predict", str(run.path), str(img), "--format", "coco"])
    assert res.exit_code != 0 and "--format coco is not valid" in str(res.exception)
    assert Run(run.path).summary["task"] == "classification"


def test_the_doctor_examines_detection_through_the_task(scenes, tmp_path):
    from visrec.doctor import ExamOptions, examine

    diag = examine(f"coco:{scenes}", model="fasterrcnn_resnet18", overrides={"task.name": "detection",
                                                                            "model.kwargs": SMALL_INPUT},
                   out=tmp_path / "doc", options=ExamOptions(overfit_steps=20, lr_steps=40))
    ids = {(f.check, f.id) for f in diag.findings}
    assert {("data", "input-not-normalized"), ("initial-loss", "initial-loss-off"),
            ("overfit", "cannot-overfit")} <= ids
    assert diag.results["overfit"]["steps"] == 10 and "map50" in diag.results["overfit"]
    assert math.isfinite(diag.results["initial_loss"]) and diag.results["lr_range"].lrs
    assert (tmp_path / "doc" / "doctor.md").is_file()
    with pytest.raises(VisrecError, match="needs boxes"):
        examine("synthetic:classes=3,size=8,train=30,test=9", model="fasterrcnn_resnet18",
                overrides={"task.name": "detection"}, out=tmp_path / "doc2")


def _users_coco_folder(root, captions: bool = False):
    """A COCO folder as a user has one: image ids from 1131, category ids 0 and 7 listed out of order and a third
    category (3) with no object, two image sizes, negatives, and a test file of its own."""
    import numpy as np

    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    cats = [{"id": 7, "name": "seven"}, {"id": 0, "name": "zero"}, {"id": 3, "name": "three"}]
    next_id = 1131
    for split, n in (("train", 12), ("test", 6)):
        images, anns, caps = [], [], []
        for i in range(1, n + 1):
            w, h = (40, 32) if i % 2 else (48, 36)  # two sizes: data.image_size resizes them, boxes with them
            a = rng.integers(0, 40, (h, w), dtype=np.uint8)
            iid, next_id = next_id, next_id + 1
            if i % 4:  # every fourth image is a negative
                a[4:20, 6:22] = 220
                anns.append({"id": 500 + len(anns), "image_id": iid, "category_id": 0 if i % 3 else 7,
                             "bbox": [6, 4, 16, 16], "area": 250.5, "iscrowd": 0})
            caps.append({"id": 900 + len(caps), "image_id": iid, "caption": "a square" if i % 4 else "nothing"})
            Image.fromarray(a).save(root / "images" / f"{split}{i}.png")
            images.append({"id": iid, "file_name": f"{split}{i}.png", "width": w, "height": h})
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": cats}))
        if captions:
            (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(
                {"images": images, "annotations": caps}))
    return root


def _pycocotools_map(gt_file, results) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_a_users_coco_folder_is_scored_by_pycocotools_against_its_own_annotation_file(tmp_path):
    root = _users_coco_folder(tmp_path / "mine")
    run = visrec.train(f"coco:{root}", model="fasterrcnn_resnet18", task="detection", epochs=3, out="runs/mine",
                       progress=False, overrides={**FAST, "model.kwargs": SMALL_INPUT, "data.image_size": 32})
    s = run.summary
    assert s["status"] == "completed"
    gt = json.loads((run.path / "ground_truth_test.json").read_text())
    assert [(c["id"], c["name"]) for c in gt["categories"]] == [(0, "zero"), (3, "three"), (7, "seven")]
    assert [im["id"] for im in gt["images"]] == list(range(1143, 1149))  # the file's own ids, names and sizes
    assert gt["images"][0] == {"id": 1143, "file_name": "test1.png", "width": 40, "height": 32}
    assert {a["category_id"] for a in gt["annotations"]} == {0, 7} and len(gt["annotations"]) == 5
    for a in gt["annotations"]:  # in the annotation's pixels, though the images were resized to 32x32
        assert a["bbox"] == pytest.approx([6, 4, 16, 16], abs=0.01) and a["area"] == 250.5
    results = json.loads((run.path / "predictions_test.json").read_text())
    assert results and {r["image_id"] for r in results} <= set(range(1143, 1149))
    assert {r["category_id"] for r in results} <= {0, 3, 7}
    # the user's own file scores the run's results to the run's own number
    assert _pycocotools_map(root / "annotations" / "instances_test.json", results) == pytest.approx(s["test_map"],
                                                                                                    abs=1e-9)
    assert json.loads((run.path / "splits.json").read_text())["category_ids"] == [0, 3, 7]
    # predict --format coco names the inputs by the run's data, keeps detections down to 0.05, scores likewise
    files = sorted((root / "images").glob("test*.png"))
    res = CliRunner().invoke(app, ["predict", str(run.path), *map(str, files), "--format", "coco"])
    assert res.exit_code == 0, res.output
    assert "all 6 input(s) found" in res.stderr
    coco = json.loads(res.stdout)
    assert coco and {r["image_id"] for r in coco} <= set(range(1143, 1149)) and min(r["score"] for r in coco) >= 0.05
    assert {r["category_id"] for r in coco} <= {0, 3, 7}
    assert 0 <= _pycocotools_map(root / "annotations" / "instances_test.json", coco) <= 1
    # a copy of the images elsewhere, named by --annotations; an unknown file is numbered after the largest id
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "test2.png").write_bytes(files[1].read_bytes())
    (other / "new.png").write_bytes(files[1].read_bytes())
    res = CliRunner().invoke(app, ["predict", str(run.path), str(other / "test2.png"), str(other / "new.png"),
                                   "--format", "coco", "--min-score", "0",
                                   "--annotations", str(root / "annotations" / "instances_test.json")])
    assert res.exit_code == 0, res.output
    assert "1 of 2 input(s) found" in res.stderr
    assert {r["image_id"] for r in json.loads(res.stdout)} <= {1144, 1149}
    res = CliRunner().invoke(app, ["predict", str(run.path), str(files[0]), "--annotations", str(tmp_path / "no")])
    assert res.exit_code != 0 and "add --format coco" in str(res.exception)


def test_a_users_coco_captions_are_scored_by_sacrebleu_against_its_own_captions_file(tmp_path):
    from sacrebleu.metrics import BLEU

    from visrec.data.text import normalize_caption

    root = _users_coco_folder(tmp_path / "mine", captions=True)
    run = visrec.train(f"coco:{root}", model="rnn", task="captioning", epochs=1, out="runs/cap", progress=False,
                       overrides={**FAST, "data.image_size": 16, "model.kwargs": {"hidden": 16, "embed": 8}})
    hyps = json.loads((run.path / "captions_test.json").read_text())
    assert [h["image_id"] for h in hyps] == list(range(1143, 1149))
    refs_doc = json.loads((root / "annotations" / "captions_test.json").read_text())
    refs = {}
    for a in refs_doc["annotations"]:
        refs.setdefault(a["image_id"], []).append(normalize_caption(a["caption"]))
    streams = [[refs[h["image_id"]][0] for h in hyps]]
    bleu = BLEU(tokenize="none", max_ngram_order=4).corpus_score([h["caption"] for h in hyps], streams).score / 100
    assert bleu == pytest.approx(run.summary["test_bleu4"], abs=1e-9)
    written = json.loads((run.path / "captions_test_references.json").read_text())
    assert written[0]["file_name"] == "test1.png" and written[0]["image_id"] == 1143


def test_a_search_tunes_a_detector_by_its_map(scenes, tmp_path):
    sets = [f"{k}={v}" for k, v in {**FAST, **{f"model.kwargs.{k}": v for k, v in SMALL_INPUT.items()}}.items()]
    res = CliRunner().invoke(app, ["tune", f"coco:{scenes}", "--task", "detection", "--model", "fasterrcnn_resnet18",
                                   "--trials", "2", "--epochs", "1", "--out", str(tmp_path / "s"),
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    assert "val map" in res.output and "batch_size" in res.output  # ranked by mAP, in the detector space


def test_overlapping_instance_masks_keep_every_pixel_of_both_objects(tmp_path):
    """Two COCO instances sharing a 4x4 square: each keeps its whole mask for Mask R-CNN's targets and the evaluation's
    ground truth, through a flip; the one-owner map (the later owns) is still what a semantic label reads."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from visrec.data.augment import mirror
    from visrec.tasks.detection import instance_masks

    root = tmp_path / "overlap"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    a, b = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    a[2:10, 2:10], b[6:14, 6:14] = 1, 1  # 64 pixels each, 16 shared
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [float(v) for v in mask_utils.toBbox(r)],
             "area": 64.0, "iscrowd": 0, "segmentation": {"size": [16, 16], "counts": r["counts"].decode()}}
            for i, r in enumerate((mask_utils.encode(np.asfortranarray(m)) for m in (a, b)), 1)]
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(root / "images" / "one.png")
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "one.png", "width": 16, "height": 16}], "annotations": anns,
         "categories": [{"id": 1, "name": "square"}]}))
    ds = visrec.load_dataset(f"coco:{root}", val_fraction=0)
    t = ds.test.targets if len(ds.test) else ds.train.targets
    whole = instance_masks(t, 0, torch.tensor([1, 2]))
    assert whole.sum(dim=(1, 2)).tolist() == [64, 64] and (whole[0] & whole[1]).sum() == 16
    assert (t["instances"][0] == 2).sum() == 64 and (t["instances"][0] == 1).sum() == 48  # the later owns
    _, flipped = mirror(torch.zeros(1, 1, 16, 16), {k: t[k][:1] for k in ("boxes", "instances", "overlaps")},
                        torch.tensor([True]))
    assert instance_masks(flipped, 0, torch.tensor([1, 2])).sum(dim=(1, 2)).tolist() == [64, 64]
    data = ds.test if len(ds.test) else ds.train
    gt = coco_ground_truth(data, ["square"], masks=True)
    assert sorted(mask_utils.area(x["segmentation"]).item() for x in gt["annotations"]) == [64, 64]
    mask = to_torchvision({k: v[:1] for k, v in t.items() if isinstance(v, torch.Tensor)}, masks=True)[0]
    assert mask["masks"].sum(dim=(1, 2)).tolist() == [64, 64]


def test_images_of_objects_keep_their_aspect_ratio_in_a_letterbox(tmp_path):
    import numpy as np

    from visrec.data.images import Fit

    root = _users_coco_folder(tmp_path / "mine")
    ds = visrec.load_dataset(f"coco:{root}", image_size=32)
    assert ds.fit == Fit(32, 32, 1.0, "pad")  # recorded in runs: serving letterboxes an upload alike
    t = ds.test.targets
    # 40x32 -> 32x26 (scale 0.8), 48x36 -> 32x24 (scale 2/3): the rest of the 32x32 is padding, below the image
    assert t["content_size"][:2].tolist() == [[26, 32], [24, 32]]
    x0, y0, x1, y1 = t["boxes"][0, 0].tolist()
    assert (x1 - x0) == pytest.approx(12.8) and (y1 - y0) == pytest.approx(13.0)  # square, within the rounding
    assert int(ds.test.images[1, :, 24:].max()) == 0 and int(ds.test.images[1, :, :24].max()) > 0
    # masks too: an annotation with a polygon is padded with "no object"
    ann = json.loads((root / "annotations" / "instances_test.json").read_text())
    for a in ann["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    (root / "annotations" / "instances_test.json").write_text(json.dumps(ann))
    inst = visrec.load_dataset(f"coco:{root}", image_size=32).test.targets["instances"]
    assert inst.shape[-2:] == (32, 32) and int(inst[1, 24:].max()) == 0 and int(np.asarray(inst[0]).max()) == 1
    # serving maps the model's letterboxed output back onto the upload: a 40x20 upload is the top 32x16 of 32x32
    from types import SimpleNamespace

    from visrec.prediction import Predictor, Prepared

    predictor = SimpleNamespace(fit=Fit.square(32, mode="pad"))
    assert Predictor.upload_scale(predictor, Prepared("u", torch.zeros(3, 32, 32), 40, 20, "PNG")) == (40.0, 40.0)


def test_a_coco_folder_above_the_memory_budget_streams_with_masks_drawn_when_read(tmp_path):
    """Its images stay in their files, letterboxed as they are read; masks are drawn per batch from the annotations;
    the user's own annotation file still scores the run's results to the run's own number."""
    root = _users_coco_folder(tmp_path / "mine")
    for split in ("train", "test"):  # polygons: the instance task learns masks
        f = root / "annotations" / f"instances_{split}.json"
        ann = json.loads(f.read_text())
        for a in ann["annotations"]:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        f.write_text(json.dumps(ann))
    eager = visrec.load_dataset(f"coco:{root}", image_size=32)
    lazy = visrec.load_dataset(f"coco:{root}", image_size=32, memory_budget="1KB")
    assert lazy.streamed and not eager.streamed and lazy.fit == eager.fit
    assert torch.equal(lazy.test.images[:], eager.test.images)  # the same letterboxed pixels
    for key in ("boxes", "box_labels", "content_size", "orig_size"):
        assert torch.equal(lazy.test.targets[key], eager.test.targets[key]), key
    assert torch.equal(lazy.test.targets["instances"][:], eager.test.targets["instances"])
    from visrec.tasks.segmentation import semantic_targets

    assert torch.equal(semantic_targets(lazy.test)[:], semantic_targets(eager.test))
    run = visrec.train(f"coco:{root}", model="maskrcnn_resnet18", task="instance", epochs=2, out="runs/lazy",
                       progress=False, overrides={**FAST, "model.kwargs": SMALL_INPUT, "data.image_size": 32,
                                                  "data.memory_budget": "1KB", "data.workers": 1,
                                                  "data.augment": ["hflip", "scale:0.8,1.25"]})  # scale jitter
    s = run.summary
    assert s["status"] == "completed" and s["data_input"]["cache"] == "none" and s["data_input"]["mode"] == "pad"
    results = json.loads((run.path / "predictions_test.json").read_text())
    if results:
        assert _pycocotools_map(root / "annotations" / "instances_test.json", results) == pytest.approx(
            s["test_map"], abs=1e-9)


def test_a_packed_coco_folder_trains_from_shards_and_scores_against_its_own_file(tmp_path):
    from visrec.data.shards import pack

    root = _users_coco_folder(tmp_path / "mine")
    index = pack(f"coco:{root}", str(tmp_path / "shards"), "8KB")
    assert index["kind"] == "objects" and len(index["splits"]["train"]["shards"]) > 1
    a = visrec.load_dataset(f"coco:{root}", image_size=32)
    b = visrec.load_dataset(f"wds:{tmp_path / 'shards'}", image_size=32)
    assert a.classes == b.classes and torch.equal(a.test.images, b.test.images)
    for key in ("boxes", "box_labels", "image_id", "orig_size", "content_size"):
        assert torch.equal(a.test.targets[key], b.test.targets[key]), key
    assert torch.equal(a.train.labels, b.train.labels)  # the same held-out validation images
    run = visrec.train(f"wds:{tmp_path / 'shards'}", model="fasterrcnn_resnet18", task="detection", epochs=2,
                       out="runs/packed", progress=False,
                       overrides={**FAST, "model.kwargs": SMALL_INPUT, "data.image_size": 32})
    s = run.summary
    assert s["status"] == "completed"
    results = json.loads((run.path / "predictions_test.json").read_text())
    if results:
        assert _pycocotools_map(root / "annotations" / "instances_test.json", results) == pytest.approx(
            s["test_map"], abs=1e-9)


def test_swa_recalibrates_a_detectors_batch_norm_through_the_tasks_own_pass():
    from visrec.models import create_model
    from visrec.tasks import DetectionTask
    from visrec.training.averaging import recompute_batchnorm

    model = create_model("fasterrcnn_resnet18", in_chans=3, num_classes=2, image_size=32,
                         **{**TINY, "min_size": 32}).eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for m in bns:
        m.running_mean.fill_(5.0)
    images = (torch.rand(6, 3, 32, 32) * 255).byte()
    task = DetectionTask(resolve_config(None, ["task.name=detection"]))
    recompute_batchnorm(model, images, lambda x: x.float() / 255, batch_size=3, forward=task.statistics_forward)
    assert all(not torch.allclose(m.running_mean, torch.full_like(m.running_mean, 5.0)) for m in bns)
    assert not model.training  # left as it was
    with pytest.raises(Exception):  # noqa: B017 - torchvision refuses a training forward without targets
        model.train()(torch.zeros(1, 3, 32, 32))
