"""Pose estimation (--task keypoints): the COCO reader's keypoints, flips that swap left and right, heatmaps and
regression that learn, PCK and pycocotools' OKS AP on the file itself, and the task's answers."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.errors import VisrecError
from visrec.tasks.keypoints import JOINTS, decode_outputs, flip_order, stickmen

FAST = {"train.min_epoch_steps": 0, "log.report": False, "train.batch_size": 32}


@pytest.fixture(scope="module")
def stick(tmp_path_factory):
    return stickmen(tmp_path_factory.mktemp("kp") / "stick", count=600, size=32)


@pytest.fixture(scope="module")
def heatmap_run(stick, tmp_path_factory):
    return visrec.train(f"coco:{stick}", task="keypoints", model="unet", epochs=10,
                        out=str(tmp_path_factory.mktemp("runs") / "heat"), progress=False,
                        overrides={**FAST, "train.batch_size": 16, "model.kwargs": {"widths": [16, 32]}})


def test_the_coco_reader_reads_keypoints_scaled_with_their_visibility(tmp_path):
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(root / "images" / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
           "categories": [{"id": 3, "name": "person", "keypoints": ["nose", "left_eye"], "skeleton": [[1, 2]]}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 2, 20, 10], "area": 200,
                            "iscrowd": 0, "num_keypoints": 1, "keypoints": [10, 6, 2, 30, 8, 0]}]}
    for split in ("train", "test"):
        (root / "annotations" / f"person_keypoints_{split}.json").write_text(json.dumps(doc))
    ds = visrec.load_dataset(f"coco:{root}", val_fraction=0.0)
    kp = ds.train.targets["keypoints"]
    assert kp.shape == (1, 1, 2, 3)
    assert kp[0, 0].tolist() == [[10.0, 6.0, 2.0], [0.0, 0.0, 0.0]]  # v=0: not labeled, no place
    small = visrec.load_dataset(f"coco:{root}", val_fraction=0.0, image_size=20)  # letterboxed: 40x20 -> 20x10
    assert small.train.targets["keypoints"][0, 0, 0].tolist() == [5.0, 3.0, 2.0]


def test_flips_swap_left_and_right_and_soft_argmax_finds_a_peak():
    order = flip_order(list(JOINTS))
    names = [JOINTS[i] for i in order]
    assert names[JOINTS.index("left_wrist")] == "right_wrist" and names[JOINTS.index("head")] == "head"
    maps = torch.full((1, 2, 8, 16), -20.0)
    maps[0, 0, 2, 12] = 20.0  # keypoint 0 at pixel (x 12, y 2)
    maps[0, 1, 5, 3] = 20.0
    xy, conf = decode_outputs(maps)
    assert torch.allclose(xy[0], torch.tensor([[12.5 / 16, 2.5 / 8], [3.5 / 16, 5.5 / 8]]), atol=1e-4)
    assert conf.min() > 0.99


def test_heatmaps_learn_and_pycocotools_on_the_file_gives_the_runs_oks_ap(heatmap_run, stick):
    s = heatmap_run.summary
    assert s["task"] == "keypoints" and s["primary_metric"] == "oks_ap" and s["head"] == "heatmaps"
    assert s["test_pck02"] > 0.8 and s["test_pck01"] <= s["test_pck02"] and s["test_oks_ap"] > 0.3
    # the run's predictions on its test files, scored by pycocotools against the COCO file itself
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ann = stick / "annotations" / "instances_test.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
    p = heatmap_run.predictor(backend="torch")
    results = []
    for img in gt.dataset["images"]:
        (pred,) = p.predict([str(stick / "images" / img["file_name"])])
        pts = pred.answer.to_json()["keypoints"]
        results.append({"image_id": img["id"], "category_id": 1, "score": float(np.mean([q["score"] for q in pts])),
                        "keypoints": [v for q in pts for v in (q["x"], q["y"], 1.0)]})
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.params.kpt_oks_sigmas = create_sigmas(heatmap_run)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(s["test_oks_ap"], abs=0.01)  # predictions rounded to 0.01 px


def create_sigmas(run):
    from visrec.tasks import create_task

    task = create_task("keypoints", run.config)
    task.names = list(JOINTS)
    return task.sigmas()


def test_regression_head_trains_resumes_exactly_and_answers_everywhere(stick, heatmap_run, tmp_path):
    from visrec import Trainer
    from visrec.config import resolve_config

    opts = {"data.name": f"coco:{stick}", "task.name": "keypoints", "model.name": "convnet", "train.epochs": 2,
            "model.kwargs": {"widths": [4, 8, 8]}, **FAST}
    cfg = resolve_config(None, [], options=opts)
    assert cfg.data.augment == [] and cfg.optim.name == "adam"  # the task's recipe
    full = Trainer(cfg, out=str(tmp_path / "full"), progress=False).fit()
    Trainer(cfg, out=str(tmp_path / "cut"), progress=False).fit(stop_after_steps=5)
    resumed = Trainer.resume(tmp_path / "cut", progress=False).fit()
    assert full.summary["head"] == "regression"
    assert full.summary["test_oks_ap"] == resumed.summary["test_oks_ap"]
    assert full.summary["test_loss"] == resumed.summary["test_loss"]
    # one answer from the library and the CLI, with a drawing
    image = stick / "images" / "test_000000.png"
    (lib,) = heatmap_run.predict([str(image)], backend="torch")
    assert [q["name"] for q in lib.answer.to_json()["keypoints"]] == list(JOINTS)
    r = CliRunner().invoke(app, ["predict", str(heatmap_run.path), str(image), "--json", "--backend", "torch",
                                 "--draw", str(tmp_path / "drawn")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0] == lib.to_json()
    assert Image.open(tmp_path / "drawn" / "test_000000.png").size == (256, 256)  # small inputs drawn enlarged


def test_data_without_keypoints_and_moving_augmentations_are_refused(stick, tmp_path):
    with pytest.raises(VisrecError, match="needs keypoint annotations"):
        visrec.train("scenes", task="keypoints", epochs=1, out=str(tmp_path / "a"), progress=False,
                     overrides={**FAST, "data.scene_count": 20, "data.scene_size": 32})
    with pytest.raises(VisrecError, match="(?s)hflip, which move pixels but not keypoints.*flips images itself"):
        visrec.train(f"coco:{stick}", task="keypoints", epochs=1, out=str(tmp_path / "b"), progress=False,
                     overrides={**FAST, "data.augment": ["hflip"]})


def test_the_served_page_draws_the_skeleton(heatmap_run, stick, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from browser import find_chromium, launch, watch_errors
    from test_serve import ServerProcess

    if find_chromium() is None:
        pytest.skip("needs a chromium binary (Debian: apt-get install chromium)")
    s = ServerProcess([str(heatmap_run.path)], tmp_path / "server.log")
    try:
        with launch() as browser:
            page = browser.new_page()
            errors = watch_errors(page)
            page.goto(s.url + "/")
            page.wait_for_selector("#card dl")
            page.set_input_files("#files", [str(stick / "images" / "test_000000.png")])
            page.wait_for_selector(".result[data-state=done]")
            card = page.query_selector(".result")
            assert len(card.query_selector_all("svg.boxes circle")) == len(JOINTS)
            assert len(card.query_selector_all("svg.boxes line")) == 14  # the skeleton's bones
            assert "14 keypoints" in card.inner_text()
            assert errors == []
    finally:
        s.stop()
