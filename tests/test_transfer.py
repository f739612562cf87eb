"""Transfer learning: class subsets, stage grouping, frozen parameters, per-stage rates, the feature cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import visrec
import visrec.training.finetune
from visrec import Trainer
from visrec.checkpoint import load_checkpoint
from visrec.cli import app
from visrec.config import FinetuneConfig
from visrec.data import load_dataset
from visrec.errors import VisrecError
from visrec.models import create_model
from visrec.training.finetune import Finetune, cached_features, stage_groups
from visrec.transfer import finetune

SYN = "synthetic:classes=4,size=12,train=384,test=128"
FAST = {"train.batch_size": 32, "train.min_epoch_steps": 0, "log.every": 4, "model.kwargs.widths": [8, 16, 16]}


@pytest.fixture
def source():
    """A network trained on classes 0-1 of the synthetic set, to transfer to classes 2-3."""
    return visrec.train(SYN, epochs=6, out="runs/source", progress=False,
                        overrides={**FAST, "data.classes": ["class0", "class1"]})


def test_data_classes_keeps_those_classes_and_renumbers_them():
    ds = load_dataset(SYN, classes=["class3", "class1"])
    assert ds.classes == ["class1", "class3"]  # the dataset's own order
    full = load_dataset(SYN)
    assert len(ds.test) == int(((full.test.labels == 1) | (full.test.labels == 3)).sum())
    assert set(ds.train.labels.tolist()) == {0, 1} and set(ds.test.labels.tolist()) == {0, 1}
    with pytest.raises(VisrecError, match="no class 'shoe'") as e:
        load_dataset(SYN, classes=["shoe"])
    assert "class0" in e.value.hint


@pytest.mark.parametrize("name", ["convnet", "resnet18", "vgg11_bn"])
def test_stage_groups_cover_every_parameter_once_in_forward_order(name):
    model = create_model(name, in_chans=3, num_classes=5, image_size=(32, 32))
    stages, head = stage_groups(model, torch.zeros(2, 3, 32, 32))
    names = [n for n, _ in model.named_parameters()]
    flat = [n for g in stages for n in g] + head
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert head == sorted(f"{model.head_path}.{k}" for k in ("weight", "bias"))
    assert len(stages) == len(model.stage_paths)
    if name == "resnet18":
        assert "conv1.weight" in stages[0] and "layer1.0.conv1.weight" in stages[0]
        assert all(n.startswith("layer4") for n in stages[-1])


def test_per_stage_learning_rates():
    ft = Finetune(FinetuneConfig(strategy="full", backbone_lr=0.1, stage_decay=0.5), [["a"], ["b"], ["c"]], ["h"])
    assert ft.lr_factors() == {"h": 1.0, "c": 0.1, "b": 0.05, "a": 0.025}
    last = Finetune(FinetuneConfig(strategy="last", stages=2), [["a"], ["b"], ["c"]], ["h"])
    assert last.frozen(0) == {"a"}
    two = Finetune(FinetuneConfig(strategy="two_stage", head_epochs=2), [["a"], ["b"]], ["h"])
    assert two.frozen(1) == {"a", "b"} and two.frozen(2) == set()


def _weights(run, tag="last"):
    return load_checkpoint(run.path / "checkpoints", tag).weights


def test_last_stage_finetune_leaves_frozen_stages_and_their_statistics_unchanged(source):
    run = finetune(str(source.path), SYN, "last", overrides={**FAST, "train.epochs": 2,
                                                              "data.classes": ["class2", "class3"]}, quiet=True)
    before, after = _weights(source), _weights(run)
    trainer_model = create_model("convnet", in_chans=3, num_classes=2, image_size=(12, 12), widths=[8, 16, 16])
    stages, head = stage_groups(trainer_model, torch.zeros(2, 3, 12, 12))
    frozen_modules = {n.rpartition(".")[0] for g in stages[:-1] for n in g}
    for k, v in after.items():
        module = k.rpartition(".")[0]
        if module in frozen_modules:  # weights, batch-norm running statistics and counters alike
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(after[n], before[n]) for n in stages[-1])  # the last stage trained
    s = run.summary
    assert s["finetune"]["strategy"] == "last" and "last 1 of 4 stages" in s["finetune"]["plan"]
    assert s["test_acc"] > 0.6
    lrs = json.loads((run.path / "checkpoints" / "last.json").read_text())["schedule"]["base_lrs"]
    assert max(lrs) == pytest.approx(0.2) and any(lr == pytest.approx(0.02) for lr in lrs)  # head lr, stage lr/10


def test_two_stage_trains_the_head_first_then_everything(source):
    cfg = visrec.resolve_config(None, {**FAST, "data.name": SYN, "data.classes": ["class2", "class3"],
                                       "train.epochs": 3, "model.weights": str(source.path),
                                       "finetune.strategy": "two_stage"})
    trainer = Trainer(cfg, out="runs/two", progress=False, quiet=True)
    spe = trainer.steps_per_epoch
    trainer.fit(stop_after_steps=spe)  # the head epoch only
    mid = _weights(visrec.Run("runs/two"))
    base = _weights(source)
    backbone = [k for k in base if not k.startswith("head.")]
    assert all(torch.equal(mid[k], base[k]) for k in backbone)
    assert trainer.schedule.factor(spe) == pytest.approx(trainer.schedule.factor(0))  # the schedule restarts
    shutil.rmtree(source.path)  # a resumed run needs only its own folder
    done = visrec.resume("runs/two", progress=False)
    assert any(not torch.equal(_weights(done)[k], base[k]) for k in backbone)


def test_linear_probe_caches_features_and_reuses_them(source, monkeypatch, tmp_path):
    monkeypatch.setenv("VISREC_CACHE", str(tmp_path / "vc"))
    opts = {**FAST, "train.epochs": 3, "data.classes": ["class2", "class3"]}
    first = finetune(str(source.path), SYN, "linear", overrides=opts, out="runs/lin1", quiet=True)
    assert first.summary["finetune"]["feature_cache_hit"] is False
    assert len(list((tmp_path / "vc" / "features").glob("*.safetensors"))) == 1

    def no_extraction(*a, **k):
        raise AssertionError("features were extracted again instead of read from the cache")

    original = visrec.training.finetune.extract_features
    monkeypatch.setattr("visrec.training.finetune.extract_features", no_extraction)
    second = finetune(str(source.path), SYN, "linear", overrides=opts, out="runs/lin2", quiet=True)
    assert second.summary["finetune"]["feature_cache_hit"] is True
    assert second.summary["test_acc"] == first.summary["test_acc"]
    base, probe = _weights(source), _weights(first)
    assert all(torch.equal(probe[k], base[k]) for k in base if not k.startswith("head."))
    # the classifier trained on cached features is the full model's head: both paths agree
    lm = first.load_model("last")
    ds = load_dataset(SYN, classes=["class2", "class3"])
    feats, hit = cached_features(lm.model, ds.train.images, lm.normalizer, tmp_path / "vc" / "features")
    assert hit
    with torch.no_grad():
        direct = lm.model(lm.normalizer(ds.train.images[:16]))
        assert torch.allclose(lm.model.get_classifier()(feats[:16]), direct, atol=1e-4)
    other = visrec.train(SYN, epochs=1, out="runs/other", progress=False, overrides=FAST)
    monkeypatch.setattr("visrec.training.finetune.extract_features", original)
    third = finetune(str(other.path), SYN, "linear", overrides=opts, out="runs/lin3", quiet=True)
    assert third.summary["finetune"]["feature_cache_hit"] is False  # another network: other features


def test_finetune_cli_from_a_weight_file_and_its_errors(source, tmp_path):
    file = tmp_path / "w.safetensors"
    save_file(_weights(source), str(file))
    args = ["--set", "model.kwargs.widths=[8,16,16]", "--set", "train.batch_size=32", "--set",
            "data.classes=[class2,class3]", "--epochs", "1", "--no-progress"]
    r = CliRunner().invoke(app, ["finetune", str(file), SYN, "--model", "convnet", "--strategy", "full",
                                 "--out", "runs/cli", "--json", *args])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output[r.output.index("{"):])
    assert s["finetune"]["strategy"] == "full" and s["status"] == "completed"
    r = CliRunner().invoke(app, ["finetune", str(file), SYN, *args])
    assert r.exit_code != 0 and "--model" in str(r.exception)
    r = CliRunner().invoke(app, ["finetune", "nowhere/at/all", SYN, *args])
    assert r.exit_code != 0 and "nowhere/at/all" in str(r.exception)
    r = CliRunner().invoke(app, ["finetune", str(source.path), SYN, "--strategy", "partial", *args])
    assert r.exit_code != 0 and "partial" in str(r.exception)
    with pytest.raises(VisrecError, match="needs weights"):
        visrec.train(SYN, epochs=1, out="runs/nw", progress=False, overrides={**FAST, "finetune.strategy": "last"})


def test_finetuning_from_a_run_uses_its_preprocessing(source):
    run = finetune(str(source.path), SYN, "linear", quiet=True,
                   overrides={**FAST, "train.epochs": 1, "data.classes": ["class2", "class3"]})
    src = json.loads((source.path / "checkpoints" / "last.json").read_text())["preprocess"]
    assert json.loads((run.path / "checkpoints" / "last.json").read_text())["preprocess"] == src


def test_finetune_from_a_torchvision_weight_file(tmp_path):
    import torchvision

    file = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), file)
    data = "synthetic:classes=3,size=32,train=96,test=48"
    with pytest.raises(VisrecError, match="conv1.weight") as e:  # grayscale data, RGB weights
        finetune(str(file), data, "last", model="resnet18", overrides={"train.epochs": 1}, quiet=True)
    assert "data.channels=3" in e.value.hint
    with pytest.raises(VisrecError, match="conv1.weight") as e:  # small images get a 3x3 stem
        finetune(str(file), data, "last", model="resnet18", overrides={"data.channels": 3}, quiet=True)
    assert "model.kwargs.stem=imagenet" in e.value.hint
    run = finetune(str(file), data, "last", model="resnet18", quiet=True,
                   overrides={"train.epochs": 1, "train.batch_size": 16, "model.kwargs.stem": "imagenet",
                              "data.channels": 3})
    s = run.summary
    assert s["status"] == "completed" and s["finetune"]["source"] == str(file)
    w = load_checkpoint(run.path / "checkpoints", "last").weights
    original = torch.load(file, weights_only=True)
    assert w["fc.weight"].shape == (3, 512)  # a new head for the new classes
    assert torch.equal(w["layer1.0.conv1.weight"], original["layer1.0.conv1.weight"])  # frozen stage kept


def test_finetuning_from_a_run_keeps_the_input_it_learned(tmp_path):
    from visrec.config import Config
    from visrec.transfer import finetune_config

    cfg = Config()
    cfg.data.name, cfg.data.image_size, cfg.data.channels = "folder:photos", 20, 1
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.yaml").write_text(cfg.to_yaml())
    ft = finetune_config(str(tmp_path / "src"), "folder:other", "last")
    assert (ft.data.image_size, ft.data.channels, ft.data.name) == (20, 1, "folder:other")
    ft = finetune_config(str(tmp_path / "src"), "folder:other", "last", overrides=["data.image_size=24"])
    assert ft.data.image_size == 24  # an override still wins
