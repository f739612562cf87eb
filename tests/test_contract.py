"""The contract every task keeps, checked for every registered task and for a task defined in a user's file:
train 2 tiny epochs -> resume exactly -> evaluate -> predict through the library and the CLI -> serve one request
-> report -> export. The answers of the library, the CLI and the server are identical.

A new task registers one entry in CASES (its tiny data and model); a task without one fails here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from visrec.cli import app
from visrec.config import resolve_config
from visrec.errors import VisrecError
from visrec.tasks import TASKS, task_class

sys.path.insert(0, str(Path(__file__).parent))
from test_serve import ServerProcess  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "images"
BASE = {"train.epochs": 2, "train.min_epoch_steps": 0, "train.batch_size": 8, "log.every": 2, "log.report": False,
        "data.val_fraction": 0.2}
SCENES = {"data.name": "scenes", "data.scene_count": 40, "data.scene_size": 32}
DETECTOR = {"fpn_channels": 16, "head_size": 16, "stem": "imagenet", "min_size": 32}
SYN = "synthetic:classes=3,size=8,train=40,test=12"
FILE_TASK = '''
from visrec.tasks import ClassificationTask


class Parity(ClassificationTask):
    """A user's task: classification under its own name (its predictor, options and step are the parent's)."""

    name = "parity"
'''
CASES: dict[str, dict] = {
    "classification": {"data.name": SYN, "model.name": "convnet", "model.kwargs": {"widths": [4, 8, 8]}},
    "localization": {**SCENES, "data.max_objects": 1, "model.name": "convnet", "model.kwargs": {"widths": [4, 8, 8]}},
    "segmentation": {**SCENES, "model.name": "unet", "model.kwargs": {"widths": [4, 8]}},
    "detection": {**SCENES, "model.name": "fasterrcnn_resnet18", "model.kwargs": DETECTOR},
    "instance": {**SCENES, "model.name": "maskrcnn_resnet18", "model.kwargs": DETECTOR},
    "captioning": {**SCENES, "data.max_objects": 2, "model.kwargs": {"embed": 16, "hidden": 32, "attn": 16}},
    "style": {"data.name": "folder:{photos}", "task.style": str(BENCH / "style.png"), "task.style_size": 24,
              "model.kwargs": {"width": 4, "blocks": 1}, "train.batch_size": 4, "optim.lr": 0.01},
    "generate": {"data.name": SYN, "model.name": "pixelcnn", "model.kwargs": {"width": 8, "blocks": 1},
                 "eval.samples": 8, "eval.nll_images": 8, "train.batch_size": 16},
    "keypoints": {"data.name": "coco:{stick}", "model.name": "unet", "model.kwargs": {"widths": [4, 8]}},
    "{file}": {"data.name": SYN, "model.name": "linear", "model.kwargs": {}},
}


def test_every_registered_task_has_a_contract_case():
    assert set(TASKS) <= set(CASES), f"add a tiny case for {sorted(set(TASKS) - set(CASES))} to CASES"


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("contract")
    photos = root / "photos"
    photos.mkdir()
    base = np.asarray(Image.open(BENCH / "content.png").convert("RGB").resize((24, 24)))
    for i in range(10):
        Image.fromarray(np.roll(base, (i, 2 * i), (0, 1))).save(photos / f"p{i}.png")
    (root / "parity.py").write_text(FILE_TASK)
    from visrec.tasks.keypoints import stickmen

    stick = stickmen(root / "stick", count=40, size=32)
    return {"photos": str(photos), "file": f"{root / 'parity.py'}:Parity", "root": str(root), "stick": str(stick)}


def _options(case: str, places: dict[str, str]) -> dict:
    name = case.format(**places)
    opts = {**BASE, **{k: v.format(**places) if isinstance(v, str) else v for k, v in CASES[case].items()},
            "task.name": name}
    return opts


@pytest.fixture(scope="module")
def trained(places) -> dict[str, tuple]:
    """Each task trained twice: 2 epochs straight, and cut after its first step then resumed."""
    from visrec import Trainer

    root = Path(places["root"])
    runs = {}
    for case in CASES:
        cfg = resolve_config(None, [], options=_options(case, places))
        full = Trainer(cfg, out=str(root / f"{case.strip('{}')}-full"), progress=False, quiet=True).fit()
        Trainer(cfg, out=str(root / f"{case.strip('{}')}-cut"), progress=False, quiet=True).fit(stop_after_steps=1)
        resumed = Trainer.resume(root / f"{case.strip('{}')}-cut", progress=False).fit()
        runs[case] = (full, resumed)
    return runs


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """One server for every run that answers for images."""
    served = [f"{case.strip('{}')}={full.path}" for case, (full, _) in trained.items()
              if task_class(full.config.task.name).Predictor is not None]
    s = ServerProcess(served, tmp_path_factory.mktemp("log") / "server.log")
    yield s
    s.stop()


def _input(run, folder: Path) -> Path:
    """An image file of the run's input size and channels."""
    lm = run.load_model()
    h, w = lm.image_size
    g = np.random.default_rng(0)
    a = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = folder / f"{run.name}.png"
    Image.fromarray(a[:, :, 0] if lm.in_chans == 1 else a).save(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_the_task_contract(case, trained, server, tmp_path):
    full, resumed = trained[case]
    s, r = full.summary, resumed.summary
    primary = s["primary_metric"]
    assert s["status"] == r["status"] == "completed"
    # resumed exactly: the same test numbers as the run that never stopped
    assert s[f"test_{primary}"] == r[f"test_{primary}"] and s.get("test_loss") == r.get("test_loss")
    # evaluated again from the run folder: the run's own number
    res = CliRunner().invoke(app, ["eval", str(full.path), "--json", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again[primary] == pytest.approx(s[f"test_{primary}"], rel=1e-5, abs=1e-6)
    # the report
    from visrec.report import build_report

    assert build_report(full.path).path.is_file()
    # export: the weights with their class names and preprocessing, and ONNX where the task's answers are tensors
    from visrec.export import export_run

    assert export_run(full.path, "safetensors", out=tmp_path / "w.safetensors").is_file()
    kind = task_class(full.config.task.name).Predictor
    if kind is None:  # a task that makes no predictions from images says what to do instead
        with pytest.raises(VisrecError, match="makes no predictions"):
            full.predict([str(_input(full, tmp_path))])
        return
    if kind.outputs == "tensor":
        assert export_run(full.path, "onnx", out=tmp_path / "m.onnx").is_file()
    # predictions: the library, the CLI and the server give one answer
    image = _input(full, tmp_path)
    (lib,) = full.predict([str(image)], backend="torch")
    assert lib.error is None
    res = CliRunner().invoke(app, ["predict", str(full.path), str(image), "--json", "--backend", "torch"])
    assert res.exit_code == 0, res.output
    (cli,) = json.loads(res.stdout)
    assert cli == lib.to_json()
    answer = httpx.post(f"{server.url}/v1/predict?model={case.strip('{}')}", content=image.read_bytes(),
                        timeout=60).json()["results"][0]
    assert {k: v for k, v in answer.items() if k != "format"} == {**lib.to_json(), "image": answer["image"]}
