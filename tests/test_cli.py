from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from visrec.cli import app

runner = CliRunner()
SYN = "synthetic:classes=3,size=10,train=150,test=60"
FAST = ["--set", "train.batch_size=32", "--set", "model.kwargs.widths=[8,8,8]", "--no-progress"]


def invoke(*args):
    from visrec.cli import VisrecError

    try:
        result = runner.invoke(app, list(args), catch_exceptions=False)
    except VisrecError as e:  # main() turns these into exit code 2; the app itself raises them
        return 2, str(e)
    # JSON goes to stdout alone; progress and messages go to stderr
    return result.exit_code, result.stdout if "--json" in args else result.output


def test_train_eval_predict_round_trip(tmp_path):
    code, out = invoke("train", SYN, "--epochs", "2", "--out", "runs/c", *FAST)
    assert code == 0, out
    assert "test accuracy" in out and "runs/c" in out and "tensorboard --logdir runs/c/tb" in out
    code, out = invoke("eval", "runs/c", "--json")
    assert code == 0
    res = json.loads(out)
    summary = json.loads((tmp_path / "runs/c/summary.json").read_text())
    assert res["acc"] == summary["test_acc"] and len(res["confusion"]) == 3
    code, out = invoke("eval", "runs/c", "--split", "val")
    assert code == 0 and "on val" in out
    img = tmp_path / "x.png"
    Image.fromarray(np.full((10, 10), 128, np.uint8), "L").save(img)
    code, out = invoke("predict", "runs/c", str(img), "--json", "--top-k", "2")
    assert code == 0
    preds = json.loads(out)
    assert preds[0]["image"] == str(img) and len(preds[0]["top"]) == 2
    assert abs(sum(t["prob"] for t in preds[0]["top"]) - 1) < 1  # probabilities, best first
    assert preds[0]["top"][0]["prob"] >= preds[0]["top"][1]["prob"]
    code, out = invoke("runs", "runs")
    assert code == 0 and "completed" in out


def test_train_json_summary(tmp_path):
    code, out = invoke("train", SYN, "--epochs", "1", "--out", "runs/j", "--json", *FAST)
    assert code == 0
    s = json.loads(out)
    assert s["status"] == "completed" and 0 <= s["test_acc"] <= 1


def test_resume_refuses_other_options(tmp_path):
    code, out = invoke("train", "--resume", "runs/none", "--epochs", "3")
    assert code == 2 and "--resume takes no other option" in out


def test_unknown_names_list_the_valid_ones():
    code, out = invoke("train", "imagenet22k")
    assert code == 2 and "unknown dataset 'imagenet22k'" in out and "fashion-mnist" in out
    code, out = invoke("train", SYN, "--model", "resnet21")
    assert code == 2 and "resnet20" in out
    code, out = invoke("train", SYN, "--set", "schedule.name=cosin")
    assert code == 2 and "did you mean 'cosine'" in out


def test_main_prints_errors_without_traceback(capsys, monkeypatch):
    import sys

    import pytest

    from visrec import cli

    monkeypatch.setattr(sys, "argv", ["visrec", "eval", "not-a-run"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not-a-run is not a visrec run folder" in err and "Traceback" not in err


def test_models_and_datasets_and_config():
    code, out = invoke("models", "--json", "--input", "1x28x28", "--classes", "10")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and {"linear", "mlp", "lenet5", "convnet", "resnet20"} <= set(rows)
    assert rows["linear"]["params"] == 784 * 10 + 10 and rows["resnet20"]["family"] == "resnet_cifar"
    code, out = invoke("datasets", "--json")
    names = {r["name"] for r in json.loads(out)}
    assert code == 0 and {"fashion-mnist", "mnist", "cifar10", "cifar100", "digits", "synthetic", "scenes"} == names
    code, out = invoke("config", "--preset", "quick", "--set", "optim.lr=0.05")
    assert code == 0 and "lr: 0.05" in out and "epochs: 2" in out
    code, out = invoke("config", "--keys")
    assert {"schedule.warmup_epochs", "task.name", "data.scene_size"} <= set(out.split())
    code, out = invoke("presets")
    assert code == 0 and "resnet20" in out
