"""The task seam: a task in a user's file trains through the same loop; observers stop runs through a handle; the
linear probe's epochs emit the same records; the doctor builds models as training does."""

from __future__ import annotations

import textwrap

import pytest
import torch

import visrec
from visrec.errors import VisrecError
from visrec.models.layers import PatchWhitening
from visrec.tasks import TASKS, ClassificationTask, create_task
from visrec.training import Callback
from visrec.transfer import finetune

SYN = "synthetic:classes=4,size=12,train=384,test=128"
FAST = {"train.batch_size": 32, "train.min_epoch_steps": 0, "log.every": 4, "log.report": False,
        "model.kwargs.widths": [8, 16, 16],
        "data.augment": []}

BRIGHTNESS = textwrap.dedent('''
    import torch
    import visrec


    class Brightness(visrec.Task):
        """Regression: predict an image's mean brightness (0..1) from its pixels."""
        target, primary, maximize, stats = "value", "mae", False, ("mae",)

        def num_outputs(self, ds):
            return 1

        def targets(self, data):
            return data.images.float().mean((1, 2, 3)) / 255

        def loss(self, outputs, targets):
            return torch.nn.functional.mse_loss(outputs[:, 0].float(), targets)

        def batch_stats(self, outputs, targets):
            return (outputs[:, 0].float() - targets).abs().sum().view(1)

        @torch.no_grad()
        def evaluate(self, model, data, normalizer, *, split, settings):
            was = model.training
            model.eval()
            device = next(model.parameters()).device
            pred = torch.cat([model(normalizer(x.to(device)))[:, 0].float().cpu() for x in data.images.split(256)])
            model.train(was)
            y = self.targets(data)
            return visrec.training.Evaluation(split, {"loss": torch.mean((pred - y) ** 2).item(),
                                                      "mae": (pred - y).abs().mean().item()})
''')


def test_a_regression_task_from_a_users_file_trains_through_the_loop(tmp_path):
    (tmp_path / "my_task.py").write_text(BRIGHTNESS)
    run = visrec.train(SYN, model="linear", task="my_task.py:Brightness", epochs=6, out="runs/b",
                       progress=False,
                       overrides={**FAST, "model.kwargs": {}, "optim.lr": 0.02, "optim.weight_decay": 0})
    s = run.summary
    assert s["task"] == "my_task.py:Brightness" and s["primary_metric"] == "mae" and s["maximize"] is False
    records = run.metrics()
    first_val = next(r["mae"] for r in records if r["split"] == "val")
    assert s["test_mae"] < 0.3 * first_val, (s["test_mae"], first_val)  # it learned: errors fell by 70%+
    windows = [r for r in records if r["kind"] == "window"]
    assert windows and all("mae" in r and "acc" not in r for r in windows)
    vals = [r["mae"] for r in records if r["split"] == "val"]
    assert s["best_val_mae"] == pytest.approx(min(vals)) and s["best_epoch"] == vals.index(min(vals)) + 1


def test_task_names_and_files_are_checked(tmp_path):
    assert set(TASKS) >= {"classification"} and isinstance(create_task("classification"), ClassificationTask)
    with pytest.raises(VisrecError, match="did you mean 'classification'"):
        create_task("clasification")
    (tmp_path / "t.py").write_text("class NotATask:\n    pass\n")
    with pytest.raises(VisrecError, match="not a subclass of visrec.training.task.Task"):
        create_task("t.py:NotATask")
    with pytest.raises(VisrecError, match="has no class 'Missing'"):
        create_task("t.py:Missing")
    with pytest.raises(VisrecError, match="needs a Task"):
        visrec.training.Trainer(visrec.resolve_config(), None)


class StopAtStep(Callback):
    def on_window(self, state, record):
        if state.step >= 8:
            state.request_stop("enough")


def test_observers_stop_a_run_through_request_stop():
    run = visrec.train(SYN, epochs=3, out="runs/stop", progress=False, overrides=FAST, callbacks=[StopAtStep()])
    s = run.summary
    assert s["status"] == "interrupted" and s["steps"] == 8 and s["error"] == "stopped by enough"
    done = visrec.resume("runs/stop", progress=False)
    # 345 training images in batches of 32: 10 steps an epoch
    assert done.summary["status"] == "completed" and done.summary["steps"] == 30


def test_the_linear_probe_emits_window_records_through_the_same_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("VISREC_CACHE", str(tmp_path / "vc"))
    source = visrec.train(SYN, epochs=1, out="runs/src", progress=False, overrides=FAST)
    probe = finetune(str(source.path), SYN, "linear", overrides={**FAST, "train.epochs": 2},
                                     out="runs/probe", quiet=True)
    windows = [r for r in probe.metrics() if r["kind"] == "window"]
    assert len(windows) == 6 and all(0 <= r["acc"] <= 1 and r["loss"] > 0 for r in windows)  # 12 steps, every 4
    assert probe.summary["finetune"]["feature_cache_hit"] is False


def test_the_doctor_builds_models_as_training_does():
    from visrec.doctor.exam import Exam, ExamOptions

    cfg = visrec.resolve_config("fmnist-fast", {"data.name": SYN})
    ds = visrec.load_dataset(SYN)
    ex = Exam(cfg, ds, None, ExamOptions())
    model = ex.new_model()
    whiten = [m for m in model.modules() if isinstance(m, PatchWhitening)]
    assert whiten and whiten[0].weight.abs().sum() > 0
    trainer = visrec.Trainer(cfg, dataset=ds, out="runs/w", progress=False, quiet=True)
    trained_first = [m for m in trainer.model.modules() if isinstance(m, PatchWhitening)][0]
    assert torch.allclose(whiten[0].weight, trained_first.weight.cpu(), atol=1e-5)


def test_what_the_loop_asks_a_task_is_what_the_task_declares(tmp_path):
    """A user's task that declares progressive resize and class scores gets them; one that does not is refused by
    what it declares, not by its name."""
    (tmp_path / "mine.py").write_text(
        "from visrec.tasks import ClassificationTask\n\n"
        "class Mine(ClassificationTask):\n    name = 'mine'\n\n"
        "class Fixed(ClassificationTask):\n    name = 'fixed'\n    progressive_resize = False\n")
    run = visrec.train("digits", model="convnet", task=f"{tmp_path / 'mine.py'}:Mine", epochs=1, out="runs/m",
                       progress=False, overrides={"train.progressive_size": 6, "log.report": False,
                                                  "model.kwargs": {"widths": [8, 16, 16]}})
    assert run.summary["status"] == "completed" and run.summary["task"] == "mine"
    from visrec.tasks import task_class

    assert task_class(f"{tmp_path / 'mine.py'}:Mine").class_scores  # ensembles and explanations take it
    with pytest.raises(VisrecError, match="fixed run .its targets are in the images' pixels"):
        visrec.train("digits", model="convnet", task=f"{tmp_path / 'mine.py'}:Fixed", epochs=1, out="runs/f",
                     progress=False, overrides={"train.progressive_size": 6, "model.kwargs": {"widths": [8, 16, 16]}})


def test_a_task_file_declares_its_own_options_checked_like_the_configs(tmp_path):
    from visrec.config import resolve_config
    from visrec.errors import VisrecError
    from visrec.tasks import create_task

    (tmp_path / "margin.py").write_text(
        "from dataclasses import dataclass\n"
        "from typing import Annotated, Literal\n"
        "from visrec.config import Range\n"
        "from visrec.tasks import ClassificationTask\n\n\n"
        "@dataclass\n"
        "class MarginOptions:\n"
        "    margin: Annotated[float, Range(0, 1)] = 0.5  # how far apart\n"
        "    mode: Literal['soft', 'hard'] = 'soft'\n\n\n"
        "class Margin(ClassificationTask):\n"
        "    Options = MarginOptions\n")
    spec = f"{tmp_path / 'margin.py'}:Margin"
    cfg = resolve_config(None, [f"task.name={spec}", "task.margin=0.25"])
    assert cfg.task.options == {"margin": 0.25} and cfg.to_dict()["task"] == {"name": spec, "margin": 0.25}
    task = create_task(spec, cfg)
    assert task.options.margin == 0.25 and task.options.mode == "soft"
    with pytest.raises(VisrecError, match="(?s)option of task .*'marg'.*did you mean 'margin'"):
        resolve_config(None, [f"task.name={spec}", "task.marg=0.1"])
    with pytest.raises(VisrecError, match="task.mode='medium'"):
        resolve_config(None, [f"task.name={spec}", "task.mode=medium"])
    with pytest.raises(VisrecError, match="task.box_loss is an option of task localization"):
        resolve_config(None, [f"task.name={spec}", "task.box_loss=giou"])
