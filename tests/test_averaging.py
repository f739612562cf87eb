"""Weight averaging (SWA, EMA against raw), snapshot ensembles, distillation and test-time augmentation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import visrec
from visrec import Trainer
from visrec.checkpoint import load_checkpoint
from visrec.cli import app
from visrec.config import ScheduleConfig
from visrec.errors import VisrecError
from visrec.evaluate import resolve_crop_pad, tta_views
from visrec.training.averaging import SWA
from visrec.training.schedules import schedule_factor, snapshot_steps

SYN = "synthetic:classes=4,size=12,train=384,test=128"
FAST = {"data.name": SYN, "train.batch_size": 32, "train.min_epoch_steps": 0, "log.every": 4,
        "model.kwargs.widths": [8, 16, 16]}


def fit(out, epochs=4, stop_after_steps=None, **overrides):
    cfg = visrec.resolve_config(None, {**FAST, "train.epochs": epochs, **overrides})
    return Trainer(cfg, out=out, progress=False, quiet=True).fit(stop_after_steps=stop_after_steps)


def test_swa_is_the_plain_mean_of_its_snapshots():
    model = nn.Linear(3, 2)
    swa, seen = None, []
    for i in range(4):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3) * (i + 1))
        seen.append(model.weight.detach().clone())
        if swa is None:
            swa = SWA(model)
        swa.update(model)
    assert swa.updates == 4
    assert torch.allclose(swa.module.weight, torch.stack(seen).mean(0), atol=1e-6)
    assert not swa.module.weight.requires_grad


def test_cyclic_cosine_restarts_and_places_one_snapshot_per_cycle():
    c = ScheduleConfig(name="cyclic_cosine", cycles=3, end_factor=0.0)
    f = schedule_factor(c, 30, 10)
    assert [f(0), f(10), f(20)] == [1.0, 1.0, 1.0]  # each cycle restarts at the full rate
    assert f(5) == pytest.approx(0.5) and f(9) < 0.03 and f(29) < 0.03
    assert snapshot_steps(c, 30, 10) == [10, 20, 30]
    c.warmup_epochs = 1.0
    assert snapshot_steps(c, 40, 10) == [20, 30, 40]
    assert snapshot_steps(ScheduleConfig(name="cosine"), 30, 10) == []
    with pytest.raises(VisrecError, match="schedule.cycles"):
        schedule_factor(ScheduleConfig(name="cyclic_cosine", cycles=0), 30, 10)


def test_swa_and_ema_are_compared_with_the_raw_weights_and_survive_a_resume():
    opts = {"average.swa": 0.5, "average.swa_every": 3, "average.ema": 0.9, "average.swa_lr": 0.05}
    straight = fit("runs/straight", **opts)
    s = straight.summary
    assert s["eval_weights"] == "last+swa"
    assert set(s["weights_compared"]) == {"raw", "ema", "swa"}
    assert s["test_acc"] == s["weights_compared"]["swa"]["test_acc"]
    assert all(0 <= v["val_acc"] <= 1 for v in s["weights_compared"].values())
    lrs = {r["step"]: r["lr"] for r in straight.metrics("train") if r["kind"] == "window"}
    total = s["steps"]
    assert all(lr == pytest.approx(0.05 * 0.2) for step, lr in lrs.items() if step > total // 2)  # held at swa_lr
    ckpt = load_checkpoint(straight.path / "checkpoints", "last")
    assert ckpt.swa is not None and ckpt.meta["swa"]["updates"] == len(range(total // 2, total + 1, 3))
    loaded = straight.load_model().model.state_dict()  # `auto` gives the weights the run was judged by
    assert all(torch.equal(loaded[k], ckpt.swa[k]) for k in loaded)
    stopped = fit("runs/stopped", stop_after_steps=total // 2 + 4, **opts)  # stop after SWA has begun
    assert stopped.status == "interrupted"
    resumed = visrec.resume(stopped.path, progress=False)
    again = load_checkpoint(resumed.path / "checkpoints", "last")
    for k in ckpt.swa:
        assert torch.equal(ckpt.swa[k], again.swa[k]), k
    assert resumed.summary["weights_compared"] == s["weights_compared"]


def test_swa_config_errors_name_the_key():
    with pytest.raises(VisrecError, match="average.swa=1.5"):
        fit("runs/x", **{"average.swa": 1.5})
    with pytest.raises(VisrecError, match="train.select=best"):
        fit("runs/x", **{"average.swa": 0.25, "train.select": "best"})


def test_snapshot_ensemble_from_one_cyclic_run(tmp_path):
    run = fit("runs/snap", **{"schedule.name": "cyclic_cosine", "schedule.cycles": 2})
    assert run.snapshots() == ["snapshot1", "snapshot2"] == run.summary["snapshots"]
    steps = [json.loads((run.path / "checkpoints" / f"{t}.json").read_text())["step"] for t in run.snapshots()]
    assert steps == [run.summary["steps"] // 2, run.summary["steps"]]
    r = CliRunner().invoke(app, ["ensemble", f"{run.path}:snapshots", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [m["member"].rsplit(":", 1)[1] for m in doc["members"]] == ["snapshot1", "snapshot2"]
    assert set(doc["combined"]) == {"probability average", "majority vote", "parameter average"}
    last = visrec.Run(run.path).load_model("last").model.state_dict()
    snap2 = visrec.Run(run.path).load_model("snapshot2").model.state_dict()
    assert all(torch.equal(last[k], snap2[k]) for k in last)  # the final cycle's snapshot is the final weights
    plain = fit("runs/plain", epochs=2)
    with pytest.raises(VisrecError, match="saved no snapshots"):
        visrec.ensemble.ensemble([f"{plain.path}:snapshots"])
    with pytest.raises(VisrecError, match="no checkpoint 'snapshot9'"):
        visrec.Run(run.path).load_model("snapshot9")


def test_distillation_loss_is_the_tempered_kl_and_a_student_trains(tmp_path):
    teachers = [fit(f"runs/t{s}", epochs=3, **{"train.seed": s}) for s in (1, 2)]
    from visrec.training.distill import Teachers

    trainer = Trainer(visrec.resolve_config(None, {**FAST, "train.epochs": 1,
                                                   "distill.teachers": [str(t.path) for t in teachers]}),
                      out="runs/probe", progress=False, quiet=True)
    t = trainer.loss_step.teachers
    assert isinstance(t, Teachers) and len(t.models) == 2 and t.temperature == 4.0
    x = trainer.normalizer(trainer.ds.train.images[:8])
    with torch.no_grad():
        probs = torch.stack([(m(x) / 4).softmax(1) for m in t.models]).mean(0)
        student = torch.randn(8, 4)
        expected = (probs * (probs.log() - F.log_softmax(student / 4, 1))).sum(1).mean() * 16
        assert t.loss(student, x).item() == pytest.approx(expected.item(), rel=1e-5)
        assert t.loss(probs.log() * 4, x).item() == pytest.approx(0.0, abs=1e-5)  # matching the teachers costs 0
    r = CliRunner().invoke(app, ["distill", *[str(t.path) for t in teachers], "--epochs", "2", "--alpha", "0.7",
                                 "--out", "runs/student", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{"):])
    assert s["status"] == "completed" and s["distill"]["alpha"] == 0.7 and s["test_acc"] > 0.4
    with pytest.raises(VisrecError, match="loss.name=cross_entropy"):
        fit("runs/bad", **{"distill.teachers": [str(teachers[0].path)], "loss.name": "hinge"})
    with pytest.raises(VisrecError, match="classes"):
        fit("runs/bad2", **{"distill.teachers": [str(teachers[0].path)],
                            "data.name": "synthetic:classes=3,size=12,train=384,test=128"})
    with pytest.raises(VisrecError, match="distillation matches class probabilities, and task segmentation"):
        fit("runs/bad3", **{"distill.teachers": [str(teachers[0].path)], "task.name": "segmentation",
                            "data.name": "scenes", "data.scene_count": 20, "data.scene_size": 32,
                            "model.name": "unet", "model.kwargs": {"widths": [4, 8]}})


def test_tta_views_are_the_course_crops_and_scales():
    x = torch.randn(2, 3, 16, 16)
    crops = tta_views("crops", x)
    assert len(crops) == 5 and torch.equal(crops[0], x)  # the center crop of the padded image is the image
    assert torch.equal(crops[1][:, :, 2:, 2:], x[:, :, :-2, :-2]) and (crops[1][:, :, :2] == 0).all()  # a corner
    assert len(tta_views("crops+flip", x)) == 10 and torch.equal(tta_views("crops+flip", x)[5], x.flip(3))
    scales = tta_views("scales", x)
    assert len(scales) == 3 and torch.equal(scales[1], x) and all(v.shape == x.shape for v in scales)
    assert (scales[0][:, :, 0] == 0).all()  # shrunk, then padded back
    assert len(tta_views("scales+flip", x)) == 6 and len(tta_views("flip", x)) == 2
    assert torch.equal(tta_views("crops", x, crop_pad=3)[4][:, :, :-3, :-3], x[:, :, 3:, 3:])  # bottom-right corner
    assert resolve_crop_pad(0, ["hflip", "crop:4"]) == 4 and resolve_crop_pad(0, ["hflip"]) == 2
    assert resolve_crop_pad(3, ["crop:4"]) == 3 and resolve_crop_pad(0, ["translate"]) == 2


def test_eval_compares_tta_modes_with_their_cost(tmp_path):
    run = fit("runs/tta", epochs=2)
    r = CliRunner().invoke(app, ["eval", str(run.path), "--tta", "all", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [row["tta"] for row in rows] == ["none", "flip", "crops", "crops+flip", "scales", "scales+flip"]
    assert [row["views"] for row in rows] == [1, 2, 5, 10, 3, 6]
    assert all(0 <= row["acc"] <= 1 and math.isfinite(row["loss"]) and row["seconds"] >= 0 for row in rows)
    assert rows[0]["acc"] == pytest.approx(run.evaluate(tta="none").acc)
    r = CliRunner().invoke(app, ["eval", str(run.path), "--tta", "none,crops"])
    assert r.exit_code == 0 and "crops" in r.output and "cost" in r.output
    r = CliRunner().invoke(app, ["eval", str(run.path), "--tta", "none,zoom"])
    assert r.exit_code != 0 and "zoom" in str(r.exception)
