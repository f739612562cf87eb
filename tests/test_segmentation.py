"""Semantic segmentation: dense networks with each of the lecture's upsamplings at any input size, split-level
pixel accuracy and mIoU from one confusion matrix with ignored pixels, masks from instances, bad input named,
and a U-Net trained end to end on scenes through the common loop."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.config import resolve_config
from visrec.data.scenes import generate_scenes
from visrec.errors import VisrecError
from visrec.models import create_model
from visrec.models.segment import UPSAMPLING
from visrec.tasks import SegmentationTask, create_task
from visrec.tasks.segmentation import confusion, iou_from_confusion, semantic_targets


@pytest.mark.parametrize("up", UPSAMPLING)
@pytest.mark.parametrize("name", ["unet", "fcn"])
def test_dense_networks_keep_any_input_size(name, up):
    torch.manual_seed(0)
    m = create_model(name, in_chans=3, num_classes=4, image_size=(45, 37), up=up, widths=[8, 16, 32])
    x = torch.randn(2, 3, 45, 37)  # neither side a multiple of the network's stride of 4
    out = m(x)
    assert out.shape == (2, 4, 45, 37) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("name,kw", [("fullres", {"width": 8, "depth": 3}), ("sliding_window", {"window": 7,
                                                                                             "width": 4})])
def test_the_lectures_first_two_ideas_score_every_pixel(name, kw):
    torch.manual_seed(0)
    m = create_model(name, in_chans=3, num_classes=4, image_size=(13, 11), **kw)
    out = m(torch.randn(2, 3, 13, 11))
    assert out.shape == (2, 4, 13, 11) and getattr(m, "dense_output", False)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    if name == "sliding_window":  # each pixel's score depends only on its window
        x = torch.randn(1, 3, 13, 11)
        y = x.clone()
        y[..., 0, 0] += 5
        with torch.no_grad():
            a, b = m(x), m(y)
        assert torch.equal(a[..., 6:, 6:], b[..., 6:, 6:]) and not torch.equal(a[..., 0, 0], b[..., 0, 0])


def test_split_metrics_come_from_one_confusion_matrix():
    true = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255]]])  # 255: ignored
    cm = confusion(true.clone(), true, 3, 255)
    iou, present = iou_from_confusion(cm)
    assert cm.sum() == 11 and iou[present].mean() == 1  # a perfect prediction, the ignored pixel left out
    shifted = torch.roll(true, 1, dims=2).clamp(max=2)
    iou2, present2 = iou_from_confusion(confusion(shifted, true, 3, 255))
    assert 0 < iou2[present2].mean() < 1
    # one matrix over the split is not the mean of per-image scores: a class missed in a small image
    a = confusion(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1]]), 2, 255)
    b = confusion(torch.tensor([[1, 1, 1, 1]] * 4), torch.tensor([[1, 1, 1, 1]] * 4), 2, 255)
    split_miou = iou_from_confusion(a + b)[0].mean().item()
    per_image = (iou_from_confusion(a)[0][iou_from_confusion(a)[1]].mean() + iou_from_confusion(b)[0][1]) / 2
    assert split_miou != pytest.approx(per_image.item())


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes("scenes:digits", count=160, size=32, max_objects=2, seed=0,
                           out=tmp_path_factory.mktemp("seg") / "coco")


def test_masks_come_from_instances_and_bad_input_is_named(scenes):
    ds = visrec.load_dataset(f"coco:{scenes}", val_fraction=0.1)
    sem = semantic_targets(ds.train)
    t = ds.train.targets
    i = int((t["box_labels"] >= 0).sum(1).argmax())  # an image with two objects
    for k in range(int((t["box_labels"][i] >= 0).sum())):
        pixels = t["instances"][i] == k + 1
        assert pixels.any() and (sem[i][pixels] == t["box_labels"][i, k] + 1).all()
    assert (sem[i][t["instances"][i] == 0] == 0).all()  # background
    task = create_task("segmentation", resolve_config(None, ["task.name=segmentation"]))
    with pytest.raises(VisrecError, match="needs per-pixel labels"):
        task.check(visrec.load_dataset("synthetic:classes=3,size=8,train=30,test=9"))
    task.check(ds)
    with pytest.raises(VisrecError, match="use --model unet"):
        task.check_model(create_model("convnet", 1, 11, 32), ds)


def test_a_unet_trains_end_to_end_and_evaluates(scenes):
    run = visrec.train(f"coco:{scenes}", model="unet", task="segmentation", epochs=4, out="runs/seg", progress=False,
                       overrides={"train.batch_size": 16, "model.kwargs.widths": [8, 16, 32], "log.report": False,
                                  "task.seg_loss": "ce+dice"})
    s = run.summary
    assert s["status"] == "completed" and s["primary_metric"] == "miou" and s["test_pix_acc"] > 0.6
    rows = (run.path / "per_class_iou.csv").read_text().splitlines()
    assert rows[0] == "class,iou,pixels" and rows[1].startswith("(background),") and len(rows) == 12
    r = CliRunner().invoke(app, ["eval", str(run.path), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["miou"] == pytest.approx(s["test_miou"], abs=1e-6) and "(background)" in res["per_class_iou"]
    from visrec.report import build_report

    rep = build_report(run.path)  # the task's section: images, true and predicted class maps
    assert "<h2>Test images</h2>" in rep.path.read_text() and len(rep.figures["task0"]) > 2000
    cm = json.loads((run.path / "pixel_confusion.json").read_text())  # rows: true class, columns: predicted
    assert sum(map(sum, cm["pixels"])) == s["n_test"] * 32 * 32 and "Pixel confusion matrix" in rep.path.read_text()


def test_the_task_is_registered_with_its_metric():
    assert SegmentationTask.primary == "miou" and create_task("segmentation").target == "semantic"
    r = CliRunner().invoke(app, ["tasks", "--json"])
    listed = {row["task"]: row["primary_metric"] for row in json.loads(r.stdout)}
    assert listed == {"classification": "acc", "localization": "loc_acc", "segmentation": "miou", "detection": "map",
                      "instance": "mask_map", "captioning": "bleu4", "style": "loss", "generate": "bpd",
                      "keypoints": "oks_ap"}
