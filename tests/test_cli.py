from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from visrec.cli import app

runner = CliRunner()
SYN = "synthetic:classes=3,size=10,train=150,test=60"
FAST = ["--set", "train.batch_size=32", "--set", "train.min_epoch_steps=0",
        "--set", "model.kwargs.widths=[8,8,8]", "--no-progress"]


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
    (tmp_path / "more" / "sub").mkdir(parents=True)
    for name in ("more/b10.png", "more/b2.png", "more/sub/a.png"):
        Image.fromarray(np.full((10, 10), 60, np.uint8), "L").save(tmp_path / name)
    (tmp_path / "more" / "notes.txt").write_text("not an image")
    code, out = invoke("predict", "runs/c", "more", str(img), "--json")  # a folder: its images, recursively
    assert code == 0, out
    assert [p["image"] for p in json.loads(out)] == ["more/b2.png", "more/b10.png", "more/sub/a.png", str(img)]
    (tmp_path / "none").mkdir()
    code, out = invoke("predict", "runs/c", "none")
    assert code == 2 and "folder none holds no image file" in out
    code, out = invoke("runs", "runs")
    assert code == 0 and "completed" in out
    (tmp_path / "runs/det").mkdir()  # another task's run shows its primary metric; a doctor folder says so
    (tmp_path / "runs/det/config.yaml").write_text((tmp_path / "runs/c/config.yaml").read_text())
    (tmp_path / "runs/det/summary.json").write_text(json.dumps({"status": "completed", "primary_metric": "map",
                                                                "test_map": 0.4321}))
    (tmp_path / "runs/doc").mkdir()
    (tmp_path / "runs/doc/config.yaml").write_text((tmp_path / "runs/c/config.yaml").read_text())
    (tmp_path / "runs/doc/doctor.md").write_text("# doctor")
    code, out = invoke("runs", "runs")
    assert code == 0 and "map 0.432" in out and "doctor report" in out


def test_train_json_summary(tmp_path):
    code, out = invoke("train", SYN, "--epochs", "4", "--out", "runs/j", "--json", *FAST)
    assert code == 0
    s = json.loads(out)
    # 4 epochs of 4 steps: measured 58-70% over seeds 0-2 (chance 33%)
    assert s["status"] == "completed" and s["steps"] == 16 and s["test_acc"] >= 0.5


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
    code, out = invoke("datasets")
    assert code == 0 and all(k in out for k in ("folder:PATH", "coco:PATH", "yolo:PATH"))
    code, out = invoke("config", "--preset", "quick", "--set", "optim.lr=0.05")
    assert code == 0 and "lr: 0.05" in out and "epochs: 2" in out
    code, out = invoke("config", "--keys")
    assert {"schedule.warmup_epochs", "task.name", "data.scene_size"} <= set(out.split())
    code, out = invoke("presets")
    assert code == 0 and "resnet20" in out


def test_help_and_completion_load_no_heavy_module():
    import subprocess
    import sys

    code = ("import sys\nfrom typer.testing import CliRunner\nfrom visrec.cli import app\n"
            "for args in (['--help'], ['train', '--help'], ['doctor', '--help'], ['--version']):\n"
            "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib', 'visrec.doctor', 'visrec.models') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    env = {"_VISREC_COMPLETE": "complete_bash", "COMP_WORDS": "visrec tr", "COMP_CWORD": "1", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", "from visrec.cli import app; app(prog_name='visrec')"],
                          capture_output=True,
                          text=True, env=env)
    assert "train" in done.stdout.split()


def test_version_and_a_dataset_is_required():
    from visrec import __version__

    code, out = invoke("--version")
    assert code == 0 and out.strip() == f"visrec {__version__}"
    code, out = invoke("train")
    assert code == 2 and "visrec train needs a DATASET" in out


def test_errors_point_at_the_fix(tmp_path):
    for args, expected in [
        (("config", "--set", "lr=0.1"), "did you mean optim.lr?"),
        (("config", "--set", "optim.lrr=0.1"), "Valid keys of section 'optim': alpha"),
        (("train", SYN, "--model", str(tmp_path / "missing.py")), "there is no file"),
        (("train", SYN, "--model", "resnet"), "resnet is a family"),
        (("train", "--set", f"data.name={tmp_path}"), f"give it as folder:{tmp_path}"),
        (("train", SYN, "--set", "data.augment=flip", *FAST), "did you mean 'hflip'?"),
    ]:
        code, out = invoke(*args)
        assert code == 2 and expected in out, (args, out)


def test_a_folder_path_reads_as_an_image_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for c, level in [("dark", 40), ("light", 200)]:
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(8):
            px = np.clip(level + rng.integers(-20, 20, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(px, "L").save(tmp_path / "imgs" / c / f"{i}.png")
    code, out = invoke("train", "imgs", "--epochs", "1", "--out", "runs/f", *FAST)
    assert code == 0, out
    cfg = (tmp_path / "runs/f/config.yaml").read_text()
    assert f"name: folder:{tmp_path / 'imgs'}" in cfg  # the run says what it read, from anywhere
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out = invoke("eval", str(tmp_path / "runs/f"), "--json")
    assert code == 0, out
    monkeypatch.chdir(tmp_path)
    code, out = invoke("explain", "runs/f", "imgs/dark", "--method", "gradcam")  # a folder of images
    assert code == 0 and "gradcam.png" in out, out
    from visrec.runs import Run

    run = Run(tmp_path / "runs/f")  # files are converted and fitted to the model's size as training did
    assert run.input_fixes(None, None) == (True, True) and run.input_fixes(False, False) == (False, False)
    from visrec.data.catalog import source_name

    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "yolo").mkdir()
    (tmp_path / "yolo" / "data.yaml").write_text("names: [a]\n")
    assert source_name("coco") == "coco:coco" and source_name("yolo") == "yolo:yolo"
    assert source_name("fashion-mnist") == "fashion-mnist" and source_name("folder:imgs") == "folder:imgs"
    assert source_name("no-such-folder") == "no-such-folder"  # left for the catalog's error, with its names
    from visrec.runs import setup_config  # visrec.train("imgs") reads it the same way

    assert setup_config(tmp_path / "imgs")[0].data.name == f"folder:{tmp_path / 'imgs'}"
    from visrec.runs import run_label  # run folders and studies are named after the folder, not its kind

    assert run_label("folder:imgs", "convnet") == "imgs-convnet"
    assert run_label("coco:/data/coco2017/", "fasterrcnn_mobilenet") == "coco2017-fasterrcnn_mobilenet"
    assert run_label("synthetic:classes=3", "nets/my.py:build") == "synthetic-my"
    assert run_label("fashion-mnist", "timm:resnet18") == "fashion-mnist-resnet18"
    code, out = invoke("baseline", "imgs", "--method", "knn", "--k", "1", "--folds", "2", "--image-size", "6",
                       "--json")  # the classic baselines name runs the same way, and can resize a folder
    assert code == 0, out
    assert "baseline-imgs-knn-raw-" in json.loads(out)["run"]
    code, out = invoke("train", "./imgz", "--epochs", "1")  # a typo in a path: the folder is named, not the catalog
    assert code == 2 and "folder" in out and "imgz does not exist" in out and "did you mean" in out and "imgs" in out
    code, out = invoke("train", "my-typo", "--epochs", "1")  # no path: a catalog name, with the catalog's names
    assert code == 2 and "unknown dataset 'my-typo'" in out


def test_run_files_follow_the_umask(tmp_path):
    import os

    from visrec.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_the_model_listing_is_kept_in_the_user_cache(monkeypatch):
    import importlib

    S = importlib.import_module("visrec.models.summary")  # the module, not the function of that name

    rows = S.model_table(["convnet", "lenet5"], (1, 28, 28), 10)
    assert [r["name"] for r in rows] == ["convnet", "lenet5"] and all(r["params"] > 0 for r in rows)

    def recomputed(*args, **kwargs):
        raise AssertionError("summarized again")

    monkeypatch.setattr(S, "model_summary", recomputed)
    assert S.model_table(["convnet", "lenet5"], (1, 28, 28), 10) == rows
