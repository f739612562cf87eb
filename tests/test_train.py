from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import visrec
from visrec import Trainer
from visrec.checkpoint import load_checkpoint
from visrec.config import resolve_config
from visrec.errors import VisrecError
from visrec.evaluate import predict_logits
from visrec.runs import Run
from visrec.training import NonFiniteLoss

SYN = "synthetic:classes=4,size=12,train=384,test=128"
FAST = {"train.batch_size": 32, "train.min_epoch_steps": 0, "log.every": 4, "model.kwargs.widths": [8, 16, 16]}


def quick(out="runs/t", epochs=5, **overrides):
    return visrec.train(SYN, epochs=epochs, out=out, overrides={**FAST, **overrides}, progress=False)


def test_train_writes_a_complete_run_folder():
    run = quick()
    p = run.path
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "splits.json", "model.txt", "confusion.csv",
              "confusion.png", "per_class.csv", "checkpoints/last.safetensors", "checkpoints/last.json",
              "checkpoints/best.safetensors", "checkpoints/best.json"):
        assert (p / f).is_file(), f
    named = json.loads((p / "checkpoints" / "last.json").read_text())["files"]
    assert {"weights", "state"} <= set(named) and all((p / "checkpoints" / e["file"]).is_file() for e in named.values())
    assert list((p / "tb").glob("events.out.tfevents.*"))
    s = run.summary
    for key in ("test_acc", "val_acc", "best_val_acc", "train_seconds", "epochs", "model", "params"):
        assert s[key] is not None, key
    assert s["status"] == "completed" and s["epochs"] == 5 and s["model"] == "convnet"
    assert s["test_acc"] > 0.9  # measured 98.4%: a working loop learns the gratings in 5 short epochs
    cfg = yaml.safe_load((p / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 5 and cfg["data"]["name"] == SYN
    recs = run.metrics()
    for r in recs:
        assert {"epoch", "step", "split", "loss", "acc", "lr", "seconds"} <= set(r)
    spe = s["n_train"] // 32
    windows = [r["step"] for r in recs if r["kind"] == "window"]
    assert windows[:2] == [4, 8] and spe in windows  # every 4 steps, and at each epoch's end
    assert {r["split"] for r in recs} == {"train", "val", "test"}
    assert [r["epoch"] for r in recs if r["split"] == "val"] == [1, 2, 3, 4, 5]
    # the checkpoint records what a prediction needs
    meta = json.loads((p / "checkpoints" / "last.json").read_text())
    assert meta["classes"] == [f"class{i}" for i in range(4)] and meta["preprocess"]["mode"] == "channel"
    assert meta["step"] == 5 * spe
    weights = load_file(str(p / "checkpoints" / "last.safetensors"))
    assert set(weights) == set(run.load_model().model.state_dict())


def test_run_evaluate_and_predict_match_training():
    run = quick()
    res = run.evaluate("test")
    assert res.acc == pytest.approx(run.summary["test_acc"], abs=1e-9)
    assert res.confusion.sum().item() == 128
    ds = visrec.load_dataset(SYN)
    # files written from test images are decoded as in training and get the same predictions
    files = []
    for i in range(6):
        f = run.path.parent / f"img{i}.png"
        Image.fromarray(ds.test.images[i, 0].numpy(), "L").save(f)
        files.append(str(f))
    preds = run.predict(files, top_k=3)
    lm = run.load_model()
    assert run.summary["tta"] == "flip"  # trained with hflip: auto evaluates with flip TTA
    logits = predict_logits(lm.model, ds.test.images[:6], lm.normalizer, tta=run.summary["tta"])
    assert [p.label for p in preds] == [ds.classes[i] for i in logits.argmax(1).tolist()]
    assert len(preds[0].top) == 3 and preds[0].top[0][1] >= preds[0].top[1][1]
    tensor_preds = run.predict(ds.test.images[0])
    assert tensor_preds[0].label == preds[0].label
    big = run.path.parent / "big.png"
    Image.fromarray(np.zeros((20, 30), np.uint8), "L").save(big)
    with pytest.raises(VisrecError, match="big.png: it is 30x20.*takes 12x12"):
        run.predict([str(big)])
    assert len(run.predict([str(big)], resize=True)) == 1
    color = run.path.parent / "color.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8), "RGB").save(color)
    with pytest.raises(VisrecError, match="color.png: it is a color image"):
        run.predict([str(color)])
    # a large color photo on a small grayscale run: one error names both fixes
    photo = run.path.parent / "photo.jpg"
    Image.fromarray(np.zeros((200, 300, 3), np.uint8), "RGB").save(photo)
    with pytest.raises(VisrecError) as e:
        run.predict([str(photo)])
    assert "pass --convert --resize" in str(e.value)
    # one bad file among good ones: the good ones are predicted, the bad one reported
    broken = run.path.parent / "broken.png"
    broken.write_bytes(b"not an image")
    mixed = run.predict([files[0], str(broken), files[1]], errors="collect")
    assert [p.error is None for p in mixed] == [True, False, True] and "cannot read image" in mixed[1].error
    assert [p.label for p in (mixed[0], mixed[2])] == [preds[0].label, preds[1].label]
    (run.path.parent / "empty.png").write_bytes(b"")
    assert "the file is empty (0 bytes" in run.predict([str(run.path.parent / "empty.png")], errors="collect")[0].error


def test_the_automatic_evaluation_batch_fits_the_device_and_image_size():
    from visrec.evaluate import eval_batch_size

    assert eval_batch_size(0, "cpu", (1, 28, 28)) == 64 and eval_batch_size(0, "cpu", (3, 32, 32)) == 32
    assert eval_batch_size(0, "cpu", (3, 224, 224)) == 16 and eval_batch_size(0, "cpu", (1, 4, 4)) == 1024
    assert eval_batch_size(0, torch.device("cuda"), (3, 224, 224)) == 1024
    assert eval_batch_size(0, "cpu", (1, 28, 28), backend="onnx") == 1024  # onnxruntime: fewer calls
    assert eval_batch_size(300, "cpu", (1, 8, 8)) == 300
    # the batch never changes the predictions: batch by batch, or all 37 images at once
    run = quick()
    lm = run.load_model()
    images = visrec.load_dataset(SYN).test.images[:37]
    one = predict_logits(lm.model, images, lm.normalizer, batch_size=37)
    assert torch.allclose(predict_logits(lm.model, images, lm.normalizer), one, atol=1e-5)
    assert torch.allclose(predict_logits(lm.model, images, lm.normalizer, batch_size=5), one, atol=1e-5)
    with pytest.raises(VisrecError, match="eval.batch_size"):
        resolve_config(None, ["eval.batch_size=-1"])


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = quick(out="runs/straight")
    steps_per_epoch = straight.summary["n_train"] // 32
    stopped = Trainer(visrec.resolve_config(None, {**FAST, "data.name": SYN, "train.epochs": 5}),
                      out="runs/stopped", progress=False).fit(stop_after_steps=steps_per_epoch + 3)  # mid-epoch 2
    assert stopped.status == "interrupted"
    assert json.loads((stopped.path / "checkpoints" / "last.json").read_text())["step"] == steps_per_epoch + 3
    resumed = visrec.resume(stopped.path, progress=False)
    assert resumed.status == "completed"
    a = load_checkpoint(straight.path / "checkpoints", "last", with_state=True)
    b = load_checkpoint(resumed.path / "checkpoints", "last", with_state=True)
    assert a.meta["step"] == b.meta["step"]
    for k in a.weights:
        assert torch.equal(a.weights[k], b.weights[k]), k
    for pid, st in a.optimizer["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b.optimizer["state"][pid][k]) if isinstance(v, torch.Tensor) else v == \
                b.optimizer["state"][pid][k]
    assert resumed.summary["test_acc"] == straight.summary["test_acc"]
    steps = [r["step"] for r in resumed.metrics() if r["kind"] == "window"]
    assert steps == sorted(set(steps))  # no window logged twice
    with pytest.raises(VisrecError, match="already completed"):
        visrec.resume(resumed.path)


def test_a_failed_validation_keeps_the_epochs_training(monkeypatch):
    from visrec.tasks.classification import ClassificationTask

    real, calls = ClassificationTask.evaluate, []

    def flaky(self, *args, split, **kw):  # the second validation fails (a full disk, a lost device...)
        calls.append(split)
        if split == "val" and calls.count("val") == 2:
            raise RuntimeError("validation failed")
        return real(self, *args, split=split, **kw)

    monkeypatch.setattr(ClassificationTask, "evaluate", flaky)
    with pytest.raises(RuntimeError, match="validation failed"):
        quick(out="runs/flaky", epochs=3)
    with open("runs/flaky/checkpoints/last.json") as f:
        meta = json.load(f)
    steps_per_epoch = 384 * 9 // 10 // 32
    assert meta["step"] == 2 * steps_per_epoch  # epoch 2's training is saved, although its validation failed
    monkeypatch.setattr(ClassificationTask, "evaluate", real)
    resumed = visrec.resume("runs/flaky", progress=False)
    assert resumed.status == "completed" and resumed.summary["steps"] == 3 * steps_per_epoch


def test_nonfinite_loss_stops_and_names_the_step():
    with pytest.raises(NonFiniteLoss) as e:
        quick(out="runs/nan", **{"optim.lr": 1e12, "schedule.name": "constant", "loss.label_smoothing": 0.0,
                                 "data.normalize": "none"})
    msg = str(e.value)
    assert "non-finite" in msg and "at step" in msg and "learning rate is too high" in msg
    assert "data.normalize=channel" in msg
    run = Run("runs/nan")
    assert run.summary["status"] == "failed"


def test_nonfinite_skip_drops_bad_steps():
    run = quick(out="runs/skip", epochs=1, **{"optim.lr": 1e12, "schedule.name": "constant",
                                              "train.nonfinite": "skip", "data.normalize": "none"})
    assert run.summary["skipped_steps"] > 0


def test_ema_and_best_selection_and_hinge_loss():
    run = quick(out="runs/ema", **{"average.ema": 0.9, "train.select": "best", "loss.name": "hinge"})
    s = run.summary
    assert s["eval_weights"] == "best+ema"
    ema = json.loads((run.path / "checkpoints" / "best.json").read_text())["files"]["ema"]["file"]
    assert (run.path / "checkpoints" / ema).is_file() and ema.endswith(".ema.safetensors")
    assert s["test_acc"] > 0.8  # measured 94.5%
    assert run.evaluate().acc == pytest.approx(s["test_acc"])


@pytest.mark.parametrize("preset", ["linear", "svm", "mlp", "lenet5", "resnet20", "fmnist-fast", "fmnist-best"])
def test_presets_train_a_few_steps(preset):
    run = visrec.train(SYN, preset=preset, epochs=1, out=f"runs/{preset}",
                       overrides={"train.batch_size": 64, "data.subset": 128, "train.min_epoch_steps": 0},
                       progress=False)
    assert run.summary["status"] == "completed" and run.summary["steps"] == 2


def test_user_model_file_trains_and_reloads(tmp_path):
    f = tmp_path / "net.py"
    f.write_text("import torch.nn as nn\n"
                 "def net(in_chans, num_classes, image_size):\n"
                 "    h, w = image_size\n"
                 "    return nn.Sequential(nn.Flatten(), nn.Linear(in_chans * h * w, 32), nn.ReLU(),\n"
                 "                         nn.Linear(32, num_classes))\n")
    run = visrec.train(SYN, model=f"{f.name}:net", epochs=2, out="runs/user", overrides=FAST, progress=False)
    assert run.config.model.name == f"{f}:net"  # stored as an absolute path
    assert run.evaluate().acc == pytest.approx(run.summary["test_acc"])


def test_existing_run_folder_is_not_overwritten():
    quick(out="runs/x", epochs=1)
    with pytest.raises(VisrecError, match="(?s)already holds a run.*--resume"):
        quick(out="runs/x", epochs=1)


def test_bad_train_settings():
    with pytest.raises(VisrecError, match="train.epochs=0 must be >= 1"):
        quick(epochs=0)
    with pytest.raises(VisrecError, match="(?s)optim.name='adamm' is not one of its values.*did you mean 'adam'"):
        quick(**{"optim.name": "adamm"})
    with pytest.raises(VisrecError, match="train.select='worst' is not one of its values: last, best"):
        quick(**{"train.select": "worst"})


def test_sigint_finishes_the_step_saves_and_can_resume():
    import os
    import signal

    from visrec.training import Callback

    class CtrlC(Callback):
        def on_window(self, state, record):
            if state.step == 8:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C

    run = visrec.train(SYN, epochs=2, out="runs/int", overrides=FAST, callbacks=[CtrlC()], progress=False)
    assert run.status == "interrupted" and "SIGINT" in run.summary["error"]
    meta = json.loads((run.path / "checkpoints" / "last.json").read_text())
    assert meta["step"] == 8  # stopped right after the step in flight
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    done = visrec.resume(run.path, progress=False)
    assert done.status == "completed" and done.summary["steps"] == 2 * (done.summary["n_train"] // 32)


def test_live_progress_bar_renders(capsys):
    quick(out="runs/live", epochs=1)  # progress=False: plain lines
    assert "epoch 1/1" in capsys.readouterr().err
    visrec.train(SYN, epochs=1, out="runs/live2", overrides=FAST, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "steps" in err


def test_auto_tta_follows_the_training_flips():
    from visrec.evaluate import resolve_tta

    assert resolve_tta("auto", ["hflip", "crop:2"]) == "flip"
    assert resolve_tta("auto", ["crop:2"]) == "none" and resolve_tta("flip", []) == "flip"
    with pytest.raises(VisrecError, match="eval.tta 'mirror' is not valid"):
        resolve_tta("mirror", [])
    run = quick(out="runs/noflip", epochs=1, **{"data.augment": []})
    assert run.summary["tta"] == "none"


def test_whitening_stem_is_fitted_on_the_training_images_and_saved():
    run = quick(out="runs/whiten", **{"model.kwargs.stem": "whiten"})
    weights = load_file(str(run.path / "checkpoints" / "last.safetensors"))
    w = weights["stem.0.weight"]
    assert w.shape == (8, 1, 3, 3)  # widths[0]=8: the 4 leading directions of the 3x3 patches, and negations
    assert not torch.equal(w[:4].reshape(4, 9), torch.eye(9)[:4])  # fitted, not the unfitted pixel-picking filters
    assert run.summary["test_acc"] > 0.9  # measured 99.2% (the conv stem: 98.4%)
    assert run.evaluate().acc == pytest.approx(run.summary["test_acc"])  # the reloaded network is the trained one


def test_small_datasets_get_smaller_batches_and_tiny_schedules_warn():
    from visrec.training.setup import epoch_batch_size, schedule_warnings

    assert epoch_batch_size(256, 1295, 20) == 64  # digits: 5 steps an epoch -> 20
    assert epoch_batch_size(256, 54000, 20) == 256  # Fashion-MNIST keeps the recipe's batch
    assert epoch_batch_size(256, 100, 20) == 16  # never below 16
    assert epoch_batch_size(256, 1295, 0) == 256  # 0 = keep the batch
    assert schedule_warnings(200, 10, 20, 64, 1295) == []
    (w,) = schedule_warnings(10, 2, 5, 256, 1295)
    assert "10 optimizer step(s)" in w and "--batch-size 32" in w


def test_a_run_that_learns_nothing_says_so():
    # Labels that no image predicts: the loss stays where it began and the test accuracy at chance.
    run = quick(out="runs/nothing", **{"optim.lr": 1e-6, "train.min_epoch_steps": 0})
    ws = run.summary["warnings"]
    assert any("stayed near its first value" in w and "visrec doctor" in w for w in ws)
    assert any("at chance" in w for w in ws)
    if run.config.log.report:
        assert "learned almost nothing" in (run.path / "report.html").read_text()
    # one logged window is no evidence: its first and last loss are the same number
    one = quick(out="runs/one-window", epochs=1, **{"log.every": 1000, "train.min_epoch_steps": 0})
    assert not any("stayed near" in w for w in one.summary.get("warnings", []))


def test_predict_applies_the_runs_own_input_pipeline(tmp_path):
    # A folder run resized every image to data.image_size: predict does the same, and converts channels as training did.
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (14, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    run = visrec.train(f"folder:{tmp_path / 'imgs'}", epochs=1, out="runs/folder", progress=False,
                       overrides={**FAST, "data.image_size": 8, "data.channels": 1, "data.val_fraction": 0,
                                  "log.report": False})
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (116, 138, 3), dtype=np.uint8)).save(photo)
    (p,) = run.predict([str(photo)])
    assert p.error is None and p.label in ("a", "b")


def test_the_gpu_preset_loads_and_trains_a_few_steps_on_the_cpu(tmp_path):
    from visrec import Trainer
    from visrec.config import resolve_config

    cfg = resolve_config("fmnist-gpu", {"device.name": "cpu", "device.precision": "fp32", "model.compile": False,
                                        "data.subset": 1024, "train.batch_size": 256})
    assert cfg.train.batch_size == 256 and cfg.model.kwargs["widths"] == [18, 128, 256]
    run = Trainer(cfg, out=str(tmp_path / "gpu"), progress=False).fit(stop_after_steps=2)
    assert run.summary["steps"] == 2


def test_the_gpu_script_says_no_gpu_cleanly_on_a_cpu_machine():
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run the bench")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("no GPU:") and "nothing run" in p.stdout


def test_a_time_budget_sets_the_schedules_length_from_the_measured_pace():
    cfg = visrec.resolve_config(None, {**FAST, "data.name": SYN, "train.time_budget": "2s", "train.epochs": 1,
                                       "log.every": 2, "schedule.name": "one_cycle", "schedule.end_factor": 0.01})
    t = Trainer(cfg, out="runs/budget", progress=False)
    s = t.fit().summary
    assert s["status"] == "completed" and s["time_budget_seconds"] == 2.0
    assert s["steps"] == s["planned_steps"] and s["epochs"] == s["epochs_planned"]
    # the schedule ran to its end, however many steps the machine's pace allowed (a plan cut short by a slower
    # pace ends at its end too)
    assert t.schedule.lr == pytest.approx(cfg.optim.lr * 0.01)


def test_the_budget_replans_as_the_pace_changes_and_resumes_with_its_plan(tmp_path):
    cfg = visrec.resolve_config(None, {**FAST, "data.name": SYN, "train.time_budget": "10s", "train.epochs": 1,
                                       "schedule.name": "linear"})
    t = Trainer(cfg, out=str(tmp_path / "r"), progress=False)
    spe, planner = t.steps_per_epoch, t.planner
    assert planner.due(1) and not planner.started
    planner.start(step=0, seconds=0.0)
    assert planner.due(5) and not planner.due(4)  # the first plan, five steps after the clock started
    total = planner.plan(5, 0.5, t.total_steps, force=True)  # 0.1 s a step: 9.5 s left -> 95 more steps
    assert abs(total - 100) <= spe // 10 and not planner.due(5)
    assert planner.plan(50, 5.02, total) is None  # about the same pace: the plan is kept (no learning-rate jitter)
    assert abs(planner.plan(50, 7.5, total) - 66) <= spe // 10  # slower (0.15 s a step): about 16 more steps
    assert planner.plan(50, 11.0, total) == 50  # over budget: the plan ends at the current step
    from visrec.training.budget import BudgetPlanner

    two = BudgetPlanner(10.0, 20, mean=lambda v: v / 2)  # across processes the ranks' mean decides
    two.start(0, 0.0)
    assert two.plan(10, 1.0, 1000, force=True) == 10 + 45  # 90 steps left here, the mean of the ranks: 45
    # a run stopped part-way resumes on the plan its checkpoint holds
    stopped = Trainer(cfg, out=str(tmp_path / "s"), progress=False).fit(stop_after_steps=3)
    planned = json.loads((stopped.path / "checkpoints" / "last.json").read_text())["planned_steps"]
    assert planned >= 3
    resumed = Trainer.resume(stopped.path, progress=False)
    assert resumed.total_steps == planned


def test_a_time_budget_refuses_what_it_cannot_plan():
    with pytest.raises(VisrecError, match="average.swa"):
        visrec.train(SYN, out="runs/x", progress=False, overrides={"train.time_budget": "5s", "average.swa": 0.25})
    with pytest.raises(VisrecError, match="duration"):
        visrec.resolve_config(None, {"train.time_budget": "soon"})


def test_progressive_resizing_trains_small_first_then_at_full_size():
    cfg = visrec.resolve_config(None, {**FAST, "data.name": SYN, "train.epochs": 2, "train.progressive_size": 8,
                                       "train.progressive_until": 0.5})
    t = Trainer(cfg, out="runs/prog", progress=False)
    sizes: list[int] = []
    t.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[-1]) if m.training else None)
    run = t.fit()
    assert run.summary["status"] == "completed"
    half = t.total_steps // 2
    assert sizes[:half] == [8] * half and set(sizes[half:]) == {12}
    with pytest.raises(VisrecError, match="progressive_size=12 is not below"):
        quick(out="runs/p2", **{"train.progressive_size": 12})
    with pytest.raises(VisrecError, match="data.normalize=pca"):
        quick(out="runs/p3", **{"train.progressive_size": 8, "data.normalize": "pca"})


def test_flip_tta_keeps_the_loss_finite_where_a_view_is_certain_and_wrong():
    """Averaging the views' softmaxes and then taking the log gave -inf for a class whose probability underflows
    in every view, and the validation loss printed as inf; log space keeps the same mean, finite."""
    from visrec.data import Normalizer
    from visrec.evaluate import evaluate

    class Sure(torch.nn.Module):  # certain of class 0 on every view
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.tensor([[200.0, -200.0, 0.0]]).expand(len(x), 3) + self.w

    data = visrec.data.ImageSet(torch.zeros(4, 1, 4, 4, dtype=torch.uint8), torch.tensor([1, 1, 0, 2]), ["a", "b", "c"])
    r = evaluate(Sure(), data, Normalizer("none", torch.zeros(1, 1, 1), torch.ones(1, 1, 1)), tta="flip")
    assert math.isfinite(r.loss) and r.loss == pytest.approx((400 + 400 + 0 + 200) / 4, rel=1e-4)
    assert r.acc == 0.25
