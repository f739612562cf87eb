"""Classification + localization: metrics that score a perfect box 1 and a shifted one less, boxes that survive
flips, bad input named, and a localizer trained end to end on one-object scenes through the common loop."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.config import resolve_config
from visrec.data.scenes import generate_scenes
from visrec.errors import VisrecError
from visrec.tasks import LocalizationTask, create_task
from visrec.training.task import EvalSettings, Evaluation


@pytest.fixture(scope="module")
def one_object(tmp_path_factory):
    """Scenes of one digit each (48x48), written once as a COCO folder."""
    return generate_scenes("scenes:digits", count=240, size=48, max_objects=1, seed=0,
                           out=tmp_path_factory.mktemp("loc") / "coco")


def _outputs(task: LocalizationTask, labels: torch.Tensor, boxes: torch.Tensor, c: int) -> torch.Tensor:
    """Head outputs that decode to exactly these classes and xyxy boxes (image fractions)."""
    logits = torch.full((len(labels), c), -5.0)
    logits[torch.arange(len(labels)), labels] = 5.0
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.cat([logits, torch.logit(torch.stack([cx, cy, w, h], 1))], 1)


def test_a_perfect_box_scores_one_and_a_shifted_one_less():
    task = LocalizationTask(resolve_config(None, ["task.name=localization"]))
    task.num_classes = 3
    labels = torch.tensor([0, 2, 1])
    px = torch.tensor([[4.0, 4, 20, 24], [10, 8, 30, 40], [0, 0, 16, 16]])  # pixels, 48x48 images
    targets = {"boxes": px[:, None], "box_labels": labels[:, None], "size": torch.full((3, 4), 48.0)}
    perfect = _outputs(task, labels, px / 48, 3)
    acc, iou, loc = (task.batch_stats(perfect, targets) / 3).tolist()
    assert acc == 1 and iou == pytest.approx(1, abs=1e-4) and loc == 1
    shifted = _outputs(task, labels, (px + torch.tensor([8.0, 0, 8, 0])).clamp(max=47.9) / 48, 3)
    _, iou2, loc2 = (task.batch_stats(shifted, targets) / 3).tolist()
    assert iou2 < 0.8 and loc2 <= 1
    wrong_class = _outputs(task, torch.tensor([1, 0, 0]), px / 48, 3)
    acc3, iou3, loc3 = (task.batch_stats(wrong_class, targets) / 3).tolist()
    assert acc3 == 0 and iou3 == pytest.approx(1, abs=1e-4) and loc3 == 0  # the box alone is not enough
    for name in ("l1", "smooth_l1", "giou", "l1+giou"):
        t = LocalizationTask(resolve_config(None, ["task.name=localization", f"task.box_loss={name}"]))
        t.num_classes = 3
        assert t.loss(perfect, targets) < t.loss(shifted, targets)


def test_bad_input_is_named(one_object, tmp_path):
    many = generate_scenes("scenes:digits", count=20, size=48, max_objects=3, seed=1, out=tmp_path / "many")
    task = create_task("localization", resolve_config(None, ["task.name=localization"]))
    with pytest.raises(VisrecError, match="(?s)exactly one object per image.*data.max_objects=1"):
        task.check(visrec.load_dataset(f"coco:{many}"))
    with pytest.raises(VisrecError, match="needs boxes"):
        task.check(visrec.load_dataset("synthetic:classes=3,size=8,train=30,test=9"))


def test_a_localizer_trains_end_to_end_and_evaluates(one_object):
    run = visrec.train(f"coco:{one_object}", model="convnet", task="localization", epochs=6, out="runs/loc",
                       progress=False, overrides={"train.batch_size": 32, "model.kwargs.widths": [16, 32, 32],
                                                  "optim.lr": 0.05, "log.report": False})
    s = run.summary
    assert s["status"] == "completed" and s["task"] == "localization" and s["primary_metric"] == "loc_acc"
    assert {"test_acc", "test_iou", "test_loc_acc", "best_val_loc_acc"} <= set(s)
    assert s["test_iou"] > 0.3  # far above a box drawn at random
    records = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert {"acc", "iou", "loc_acc"} <= set(records[0])  # the task's statistics in the training records
    r = CliRunner().invoke(app, ["eval", str(run.path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["loc_acc"] == pytest.approx(s["test_loc_acc"], abs=1e-6)
    # the task draws its own report section: test images with the true and the predicted box
    from visrec.report import build_report

    with pytest.raises(VisrecError, match="is a localization run: the explanations are written for classification"):
        visrec.explain.explain(run.path, "gradcam")
    with pytest.raises(VisrecError, match="ensembles average the class probabilities of classification runs"):
        visrec.ensemble.ensemble([str(run.path), str(run.path)])
    (pred,) = run.predict([str(one_object / "images" / sorted(p.name for p in (one_object / "images").iterdir())[0])])
    assert pred.label in pred.answer.to_json()["top"][0]["class"] and len(pred.answer.box) == 4
    rep = build_report(run.path)
    page = rep.path.read_text()
    assert "<h2>Test images</h2>" in page and "predicted box" in page
    assert Image.open(io.BytesIO(rep.figures["task0"])).size[0] > 300
    # served: the class, and the box in the upload's own pixels, whatever its size; Grad-CAM explains the class
    from visrec.serve.model import ServedModel

    served = ServedModel(run.path).load()
    first = one_object / "images" / sorted(p.name for p in (one_object / "images").iterdir())[0]
    small, big = io.BytesIO(), io.BytesIO()
    Image.open(first).save(small, format="PNG")
    Image.open(first).resize((96, 64), Image.Resampling.BILINEAR).save(big, format="PNG")
    item = served.prepare(big.getvalue(), "b")
    assert tuple(item.x.shape[-2:]) == (48, 48) and (item.width, item.height) == (96, 64)
    a, b = served.infer([served.prepare(small.getvalue(), "a"), item], 2)
    assert len(a["top"]) == 2 and a["top"][0]["class"] in served.classes
    p = served.predictor
    frac = p.splitter.split_outputs(p.forward(item.x[None]).float())[1][0]  # the box, in image fractions
    assert b["box"] == pytest.approx((frac.clamp(0, 1) * torch.tensor([96, 64, 96, 64])).tolist(), abs=0.01)
    assert served.explain([served.prepare(small.getvalue(), "a")])[0].startswith("data:image/png;base64,")
    bigfile = one_object / "big.png"
    bigfile.write_bytes(big.getvalue())
    r = CliRunner().invoke(app, ["predict", str(run.path), str(bigfile), "--json", "--top-k", "2"])
    assert r.exit_code == 1 and "pass --resize" in r.output  # one rule for every task, as classification refuses it
    r = CliRunner().invoke(app, ["predict", str(run.path), str(bigfile), "--json", "--top-k", "2", "--draw",
                                 str(one_object / "drawn"), "--resize"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout[: r.stdout.rindex("]") + 1])[0]
    assert row["box"] == b["box"] and (row["width"], row["height"]) == (96, 64)
    assert Image.open(one_object / "drawn" / "big.png").size == (96, 64)


def test_flips_keep_the_box_on_its_object():
    from visrec.data.augment import HFlip

    x = torch.zeros(1, 1, 8, 8)
    x[..., 1:3, 0:2] = 1  # an object in the top-left corner
    y = {"boxes": torch.tensor([[[0.0, 1, 2, 3]]]), "box_labels": torch.tensor([[0]]), "size": torch.full((1, 4), 8.)}
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):  # a random flip: either way the box covers the object
        out, t = HFlip()(x, y, gen, None)
        x0, y0, x1, y1 = t["boxes"][0, 0].int().tolist()
        assert out[0, 0, y0:y1, x0:x1].sum() == 4 and t["size"].equal(y["size"])


def test_evaluation_of_an_empty_split():
    task = LocalizationTask(resolve_config(None, []))
    task.num_classes = 2
    data = visrec.ImageSet(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), ["a", "b"],
                           targets={"boxes": torch.zeros(0, 1, 4), "box_labels": torch.zeros(0, 1, dtype=torch.long)})
    from visrec.data import Normalizer

    res = task.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6)), data,
                        Normalizer.fit(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "none"), split="test",
                        settings=EvalSettings())
    assert isinstance(res, Evaluation) and res.metrics["loc_acc"] == 0
