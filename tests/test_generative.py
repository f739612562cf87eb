"""Generative models: masked convolutions see only the past, the ELBO bounds the importance-sampled likelihood, FID
behaves, DDPM's loss at both ends of the chain, and every model trains, saves, resumes and samples through the
loop; the errors of `visrec sample` and the task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.errors import VisrecError
from visrec.models import create_model
from visrec.runs import Run
from visrec.tasks.generate import FeatureNet, fid_kid

SYN = "synthetic:classes=3,size=8,train=96,test=24"
FAST = {"train.min_epoch_steps": 0, "train.batch_size": 16, "eval.samples": 16, "data.val_fraction": 0.2}


@pytest.mark.parametrize("name,kw", [("pixelcnn", {"width": 12, "blocks": 2}),
                                     ("gated_pixelcnn", {"width": 24, "layers": 3, "kernel": 3}),
                                     ("row_lstm", {"width": 24})])
@pytest.mark.parametrize("channels", [1, 3])
def test_masked_models_never_see_the_current_or_future_pixels(name, kw, channels):
    torch.manual_seed(0)
    m = create_model(name, in_chans=channels, num_classes=channels, image_size=6, **kw).eval()
    x = torch.randint(0, 256, (1, channels, 6, 6)).float()
    base = m.logits(x)
    order = [(i, j, c) for i in range(6) for j in range(6) for c in range(channels)]
    for (i, j, c) in [(2, 3, 0), (2, 3, channels - 1), (0, 0, 0), (5, 5, channels - 1)]:
        y = x.clone()
        y[0, c, i, j] = (y[0, c, i, j] + 97) % 256
        changed = (m.logits(y) - base).abs().amax(1)[0]  # (C, H, W): any logit of that output
        for (ii, jj, cc) in order:
            if (ii, jj, cc) <= (i, j, c):  # the perturbed value itself and everything before it
                assert changed[cc, ii, jj] < 1e-5, (name, (i, j, c), (ii, jj, cc))
        if i + 1 < 6:
            assert changed[:, i + 1, j].max() > 1e-7  # the pixel below sees it
        if c + 1 < channels:
            assert changed[c + 1, i, j] > 1e-7  # the next channel of the same pixel sees it


def test_the_elbo_never_exceeds_the_importance_sampled_log_likelihood():
    torch.manual_seed(0)
    m = create_model("vae", in_chans=1, num_classes=1, image_size=8, latent=4, width=8).eval()
    x = m.binarize(torch.randint(0, 256, (4, 1, 8, 8)).float(), torch.Generator().manual_seed(0))
    with torch.no_grad():
        elbo = torch.stack([m.elbo(x, x)[0] for _ in range(200)]).mean(0)
        log_p = -m.importance_nll(x, k=500)
    assert (elbo <= log_p).all(), (elbo, log_p)
    with pytest.raises(VisrecError, match="no likelihood"):
        create_model("dcgan", in_chans=1, num_classes=1, image_size=8).bits_per_dim(x)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    torch.manual_seed(0)
    net = create_model("convnet", in_chans=1, num_classes=3, image_size=(8, 8), widths=[4, 8, 8])
    f = FeatureNet(net, lambda x: x.float() / 255, 1, (8, 8), "a random convnet")
    a = torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8)
    same = fid_kid(f, a, a.clone())
    noisy = [fid_kid(f, a, (a.float() + s * torch.randn(a.shape)).clamp(0, 255).byte())["fid"] for s in (10, 40)]
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3
    assert 0 < noisy[0] < noisy[1]
    with pytest.raises(VisrecError, match="3-channel"):
        FeatureNet(create_model("convnet", in_chans=3, num_classes=3, image_size=(8, 8), widths=[4, 8, 8]),
                   lambda x: x.float(), 3, (8, 8), "rgb").adapt(torch.zeros(2, 2, 8, 8))


def test_ddpm_noise_prediction_loss_at_both_ends_of_the_chain():
    m = create_model("ddpm", in_chans=1, num_classes=1, image_size=8, width=8, timesteps=100)
    class Echo(torch.nn.Module):  # a "model" that answers x_t: right at t = T (pure noise), wrong at t = 0
        def forward(self, xt, t):
            return xt

    m.net = Echo()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 1, 8, 8, generator=g)
    for t in (0, 99):
        a = m.abar[t]
        want = ((a.sqrt() * x0 + ((1 - a).sqrt() - 1) * eps) ** 2).flatten(1).mean(1)
        got = m.loss_at(x0, torch.full((4,), t), eps)
        assert torch.allclose(got, want, atol=1e-6)
    assert m.loss_at(x0, torch.full((4,), 99), eps).mean() < 0.01 < m.loss_at(x0, torch.full((4,), 0), eps).mean()
    assert m.abar[0] > 0.99 and m.abar[-1] < 0.01  # t=0 is nearly the image, t=T nearly pure noise


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "clf"
    return visrec.train(SYN, epochs=2, out=str(out), progress=False,
                        overrides={"train.min_epoch_steps": 0, "model.kwargs.widths": [4, 8, 8]}).path


MODELS = {"pixelcnn": {"width": 8, "blocks": 1}, "gated_pixelcnn": {"width": 8, "layers": 2, "kernel": 3},
          "row_lstm": {"width": 8}, "vae": {"latent": 2, "width": 8}, "dcgan": {"latent": 8, "width": 8},
          "wgan_gp": {"latent": 8, "width": 8}, "ddpm": {"width": 8, "timesteps": 20}}


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_trains_saves_resumes_and_samples(name, feature_run, tmp_path):
    from visrec import Trainer
    from visrec.config import resolve_config

    opts = {"data.name": SYN, "task.name": "generate", "model.name": name, "train.epochs": 2,
            "model.kwargs": MODELS[name], "eval.feature_run": str(feature_run), "eval.sample_steps": 5,
            "eval.importance_samples": 20, "eval.nll_images": 8, **FAST}
    cfg = resolve_config(None, [], options=opts)
    Trainer(cfg, out=str(tmp_path / "cut"), progress=False).fit(stop_after_steps=5)
    run = Trainer.resume(tmp_path / "cut", progress=False).fit()
    s = run.summary
    assert s["status"] == "completed" and s["task"] == "generate"
    p = s["primary_metric"]
    assert p == {"dcgan": "fid", "wgan_gp": "fid", "ddpm": "loss"}.get(name, "bpd") and math.isfinite(s[f"test_{p}"])
    if name in ("dcgan", "wgan_gp", "ddpm", "vae"):
        assert s["test_fid_floor"] >= 0 and s["test_samples"] == 16 and 1 <= s["test_classes_present"] <= 3
    if name == "vae":
        assert s["test_nll_bpd"] <= s["test_bpd"] + 0.05  # the importance-sampled NLL is the tighter one
    assert (run.path / "samples" / "test.png").is_file() and (run.path / "samples.npz").is_file()
    r = CliRunner().invoke(app, ["sample", str(run.path), "--n", "5", "--seed", "3", "--out",
                                 str(tmp_path / "s.png")] + (["--steps", "4"] if name == "ddpm" else []))
    assert r.exit_code == 0, r.output
    a = np.load(tmp_path / "s.npz")["images"]
    assert a.shape == (5, 1, 8, 8) and a.dtype == np.uint8 and Image.open(tmp_path / "s.png").size[0] > 8
    again = CliRunner().invoke(app, ["sample", str(run.path), "--n", "5", "--seed", "3", "--out",
                                     str(tmp_path / "t.png")] + (["--steps", "4"] if name == "ddpm" else []))
    assert again.exit_code == 0 and (np.load(tmp_path / "t.npz")["images"] == a).all()  # seeded


def test_eval_and_the_report_of_a_generate_run(feature_run, tmp_path):
    run = visrec.train(SYN, task="generate", model="vae", epochs=1, out=str(tmp_path / "v"), progress=False,
                       overrides={**FAST, "model.kwargs": MODELS["vae"], "eval.feature_run": str(feature_run),
                                  "eval.importance_samples": 20, "eval.nll_images": 8})
    r = CliRunner().invoke(app, ["eval", str(run.path), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["bpd"] == pytest.approx(run.summary["test_bpd"], rel=1e-6) and "fid" in ev and "fid_floor" in ev
    from visrec.report import build_report

    html = build_report(run.path).path.read_text()
    assert "latent interpolation" in html and "2-D latent manifold" in html and "Memorization" in html


def test_bad_input_is_named_with_the_fix(feature_run, tmp_path):
    r = CliRunner().invoke(app, ["sample", str(feature_run), "--n", "4"])
    assert r.exit_code != 0 and "draws from generate runs" in str(r.exception)
    with pytest.raises(VisrecError, match="average.ema=0.5 on a GAN"):
        visrec.train(SYN, task="generate", model="dcgan", epochs=1, out=str(tmp_path / "e"), progress=False,
                     overrides={**FAST, "average.ema": 0.5, "eval.feature_run": str(feature_run)})
    with pytest.raises(VisrecError, match="judged by FID"):
        visrec.train(SYN, task="generate", model="dcgan", epochs=1, out=str(tmp_path / "f"), progress=False,
                     overrides={**FAST, "eval.feature_run": "none"})
    folder = tmp_path / "photos" / "all"  # a user's folder has no default FID network: said before training
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(VisrecError, match="FID needs a feature network, and folder:.* has no default one"):
        visrec.train(f"folder:{tmp_path / 'photos'}", task="generate", model="dcgan", epochs=1,
                     out=str(tmp_path / "u"), progress=False, overrides=FAST)
    assert not (tmp_path / "u").exists()
    with pytest.raises(VisrecError, match="eval.feature_run=none to leave FID out"):
        visrec.train(f"folder:{tmp_path / 'photos'}", task="generate", model="vae", epochs=1,
                     out=str(tmp_path / "v"), progress=False, overrides={**FAST, "model.kwargs": MODELS["vae"]})
    with pytest.raises(VisrecError, match="not a generative model"):
        visrec.train(SYN, task="generate", model="convnet", epochs=1, out=str(tmp_path / "g"), progress=False,
                     overrides=FAST)
    run = visrec.train(SYN, task="generate", model="pixelcnn", epochs=1, out=str(tmp_path / "p"), progress=False,
                       overrides={**FAST, "model.kwargs": MODELS["pixelcnn"], "eval.feature_run": "none"})
    r = CliRunner().invoke(app, ["sample", str(run.path), "--n", "0"])
    assert r.exit_code != 0 and "--n 0" in str(r.exception)
    r = CliRunner().invoke(app, ["sample", str(run.path), "--steps", "3"])
    assert r.exit_code != 0 and "--steps is for diffusion runs" in str(r.exception)
    assert Run(run.path).summary["primary_metric"] == "bpd"


def test_the_default_feature_network_is_trained_once_and_cached(tmp_path):
    from visrec.io import user_cache_dir
    from visrec.tasks.generate import feature_net

    with torch.no_grad():  # as an evaluation calls it: the training inside must still have gradients
        f = feature_net("", SYN)
    folder = user_cache_dir() / "feature_runs"
    assert f.num_features > 0 and len(list(folder.iterdir())) == 1
    made = next(folder.iterdir()).stat().st_mtime
    assert feature_net("", SYN).num_features == f.num_features and next(folder.iterdir()).stat().st_mtime == made
    with pytest.raises(VisrecError, match="eval.feature_run=RUN"):
        feature_net("", f"folder:{tmp_path}")


def test_fid_every_measures_the_validation_fid_every_n_epochs_and_picks_the_best_among_them(feature_run, tmp_path):
    run = visrec.train(SYN, task="generate", model="dcgan", epochs=3, out=str(tmp_path / "g"), progress=False,
                       overrides={**FAST, "model.kwargs": MODELS["dcgan"], "eval.feature_run": str(feature_run),
                                  "eval.fid_every": 2, "train.select": "best"})
    val = run.metrics("val")
    assert ["fid" in r for r in val] == [False, True, False]  # epochs 2 only (of 1..3)
    s = run.summary
    assert s["status"] == "completed" and s["best_epoch"] == 2 and math.isfinite(s["test_fid"])


def test_an_interrupted_feature_network_is_never_cached_and_a_broken_entry_is_rebuilt(tmp_path, monkeypatch):
    from visrec.io import user_cache_dir
    from visrec.tasks import generate
    from visrec.training.loop import Trainer

    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, **kw: fit(self, stop_after_steps=2))  # as a SIGTERM would
    said = []
    with pytest.raises(VisrecError, match="was interrupted .*nothing was cached"):
        generate.default_feature_run(SYN, say=said.append)
    assert said and "training the feature network for FID once" in said[0] and "cached in" in said[0]
    folder = user_cache_dir() / "feature_runs"
    assert [p.name for p in folder.iterdir()] == []  # no entry, and no temporary folder left behind
    # an entry left by an older visrec from an interrupted run is rebuilt, and said so
    monkeypatch.setattr(Trainer, "fit", fit)
    stale = folder / "synthetic_classes_3_size_8_train_96_test_24"
    stale.mkdir(parents=True)
    (stale / "summary.json").write_text(json.dumps({"status": "interrupted", "test_acc": None}))
    said.clear()
    got = generate.default_feature_run(SYN, say=said.append)
    assert got == stale and "rebuilt: its training did not complete (status 'interrupted')" in said[0]
    assert Run(got).summary["status"] == "completed" and isinstance(Run(got).summary["test_acc"], float)
    assert [p.name for p in folder.iterdir()] == [stale.name]


def test_a_signal_during_the_test_evaluation_keeps_the_training_and_resuming_finishes_it(feature_run, tmp_path,
                                                                                        monkeypatch):
    import os
    import signal

    from visrec.tasks.generate import GenerateTask

    evaluate = GenerateTask.evaluate

    def stopped_in_test(self, model, data, normalizer, *, split, settings):
        if split == "test":
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, model, data, normalizer, split=split, settings=settings)

    monkeypatch.setattr(GenerateTask, "evaluate", stopped_in_test)
    sets = {**FAST, "eval.feature_run": str(feature_run), "model.kwargs.latent": 2, "model.kwargs.width": 8}
    r = CliRunner().invoke(app, ["train", SYN, "--task", "generate", "--model", "vae", "--epochs", "1", "--out",
                                 str(tmp_path / "v"), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    assert r.exit_code == 130, r.output  # interrupted
    s = Run(tmp_path / "v").summary
    assert s["status"] == "interrupted" and "during the test evaluation" in s["error"] and s["test_bpd"] is None
    assert "continue with: visrec train --resume" in r.stderr and "evaluating the test split" in r.stderr
    monkeypatch.setattr(GenerateTask, "evaluate", evaluate)
    run = visrec.resume(tmp_path / "v", progress=False)
    assert run.summary["status"] == "completed" and math.isfinite(run.summary["test_bpd"])
    assert run.summary["steps"] == s["steps"]  # nothing trained again


def test_the_doctor_examines_a_generative_model_through_the_task(tmp_path):
    from visrec.doctor import ExamOptions, examine

    diag = examine(SYN, model="pixelcnn", overrides={"task.name": "generate", "model.kwargs": MODELS["pixelcnn"],
                                                     "eval.feature_run": "none"},
                   out=tmp_path / "doc", options=ExamOptions(overfit_steps=40, lr_steps=40))
    found = {(f.check, f.id): f for f in diag.findings}
    assert found[("data", "input-not-normalized")].severity == "ok"  # raw pixels are what these models take
    assert diag.results["overfit"]["last_loss"] < diag.results["overfit"]["first_loss"]
    assert "bpd" in diag.results["overfit"] and diag.results["lr_range"].lrs


def test_a_gan_trained_alternately_has_two_optimizers_a_faster_critic_and_resumes_bitwise(feature_run, tmp_path):
    from visrec import Trainer
    from visrec.checkpoint import load_checkpoint
    from visrec.config import resolve_config

    opts = {"data.name": SYN, "task.name": "generate", "model.name": "wgan_gp", "train.epochs": 2,
            "model.kwargs": {**MODELS["wgan_gp"], "n_critic": 2}, "eval.feature_run": str(feature_run),
            "task.gan_update": "alternating", "task.critic_lr_scale": 4.0, "optim.name": "adam", "optim.lr": 1e-3,
            **FAST}
    cfg = resolve_config(None, [], options=opts)
    t = Trainer(cfg, out=str(tmp_path / "full"), progress=False)
    assert set(t.optimizer.named) == {"critic", "generator"}
    lrs = {g["optimizer"]: g["lr"] for g in t.optimizer.state_dict()["param_groups"]}
    assert lrs["critic"] == pytest.approx(4 * lrs["generator"])
    full = t.fit()
    Trainer(cfg, out=str(tmp_path / "cut"), progress=False).fit(stop_after_steps=3)  # mid-rhythm: 3 % n_critic
    resumed = Trainer.resume(tmp_path / "cut", progress=False).fit()
    a = load_checkpoint(full.path / "checkpoints", "last", with_state=True)
    b = load_checkpoint(resumed.path / "checkpoints", "last", with_state=True)
    assert a.weights.keys() == b.weights.keys()
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)  # bitwise, both networks
    assert {g["optimizer"] for g in a.optimizer["param_groups"]} == {"critic", "generator"}
    assert full.summary["test_fid"] == resumed.summary["test_fid"]
    w = [r for r in full.metrics("train") if r.get("kind") == "window"]
    assert w and all(math.isfinite(r["g_loss"]) and math.isfinite(r["d_loss"]) for r in w)
