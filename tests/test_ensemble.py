"""Ensembles: the averaging math, batch-norm recomputation, and members trained with --seeds."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from visrec.cli import app
from visrec.data.preprocess import Normalizer
from visrec.ensemble import average_state_dicts, ensemble, majority_vote, recompute_batchnorm
from visrec.errors import VisrecError

SYN = "synthetic:classes=4,size=12,train=384,test=128"


def test_majority_vote_breaks_ties_by_mean_probability():
    p = torch.tensor([[[0.6, 0.4, 0.0]], [[0.1, 0.5, 0.4]], [[0.0, 0.45, 0.55]], [[0.7, 0.2, 0.1]]])
    # votes: class 0 twice, class 1 once, class 2 once -> 0
    assert majority_vote(p).tolist() == [0]
    tie = torch.tensor([[[0.6, 0.4]], [[0.3, 0.7]]])  # one vote each; mean probabilities 0.45 vs 0.55 -> 1
    assert majority_vote(tie).tolist() == [1]


def test_average_state_dicts_is_the_elementwise_mean_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    avg = average_state_dicts([a, b])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and avg["n"].item() == 5
    with pytest.raises(VisrecError, match="different names"):
        average_state_dicts([a, {"v": torch.zeros(2)}])


def test_recomputed_batchnorm_statistics_are_the_data_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.BatchNorm2d(3)).eval()
    model[1].running_mean.fill_(100.0)  # stale statistics, as after averaging weights
    images = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8)
    norm = Normalizer("none", torch.zeros(3, 1, 1), torch.ones(3, 1, 1))
    recompute_batchnorm(model, images, norm, batch_size=16)  # 4 equal batches
    x = images.float()
    assert torch.allclose(model[1].running_mean, x.mean((0, 2, 3)), atol=1e-3)
    batch_vars = torch.stack([c.var((0, 2, 3), unbiased=True) for c in x.split(16)]).mean(0)
    assert torch.allclose(model[1].running_var, batch_vars, rtol=1e-4)
    assert model[1].momentum == 0.1 and not model.training  # settings restored


def test_seeds_train_members_and_the_ensemble_reports_each_combination(tmp_path):
    r = CliRunner().invoke(app, ["train", SYN, "--epochs", "2", "--seeds", "1,2,3", "--out", str(tmp_path / "m"),
                                 "--no-progress", "--set", "model.kwargs.widths=[8,16,16]", "--set",
                                 "train.batch_size=32", "--set", "train.select=best"])
    assert r.exit_code == 0, r.output
    folders = [str(tmp_path / f"m-seed{s}") for s in (1, 2, 3)]
    assert "visrec ensemble " + " ".join(folders) in r.output.replace("\n", "")
    seeds = [yaml.safe_load((tmp_path / f"m-seed{s}" / "config.yaml").read_text())["train"]["seed"] for s in (1, 2, 3)]
    assert seeds == [1, 2, 3]
    r = CliRunner().invoke(app, ["ensemble", *folders, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert len(rep["members"]) == 3 and set(rep["combined"]) == {"probability average", "majority vote"}
    assert all(0 <= v <= 1 for v in rep["combined"].values())
    # Checkpoints of one run: the parameter average joins (batch-norm statistics recomputed).
    one = ensemble([f"{folders[0]}:last", f"{folders[0]}:best"])
    assert "parameter average" in one.combined and one.combined["parameter average"] > 0.5
    with pytest.raises(VisrecError, match="at least two"):
        ensemble(folders[:1])
    import shutil  # a member read with other settings is refused, naming each difference

    other = tmp_path / "other"
    shutil.copytree(folders[1], other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["image_size"], cfg["data"]["split_seed"] = 16, 3
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(VisrecError, match=r"data.split_seed \(3 against 0\), data.image_size \(16 against None\)"):
        ensemble([folders[0], str(other)])
