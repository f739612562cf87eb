"""Weight initialization (`model.init`): each scheme gives the variance its formula says, biases are zeroed, LSUV
brings every layer's output variance to 1, and a run records and uses the scheme."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

import visrec
from visrec.errors import VisrecError
from visrec.models.init import init_weights, parse_init


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 30 * 30, 400), nn.ReLU(),
                         nn.Linear(400, 300))


@pytest.mark.parametrize("spec, conv_var, linear_var", [
    ("normal:0.01", 1e-4, 1e-4),
    ("xavier", 2 / (8 * 9 + 64 * 9), 2 / (400 + 300)),
    ("xavier_normal", 2 / (8 * 9 + 64 * 9), 2 / (400 + 300)),
    ("he", 2 / (8 * 9), 2 / 400),
    ("he_uniform", 2 / (8 * 9), 2 / 400),
    ("he_fan_out", 2 / (64 * 9), 2 / 300),
])
def test_each_scheme_gives_its_formulas_variance(spec, conv_var, linear_var):
    torch.manual_seed(0)
    model = init_weights(net(), spec)
    conv, last = model[0], model[5]
    assert conv.weight.var().item() == pytest.approx(conv_var, rel=0.1)
    assert last.weight.var().item() == pytest.approx(linear_var, rel=0.05)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in (conv, model[3], last))


def test_orthogonal_rows_are_orthonormal():
    torch.manual_seed(0)
    w = init_weights(net(), "orthogonal")[5].weight  # 300 x 400: rows orthonormal
    assert torch.allclose(w @ w.T, torch.eye(300), atol=1e-4)


def test_dirac_convolutions_pass_their_first_channels_through():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1),
                          nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(4, 4, 2), nn.Linear(4, 3))
    before = {i: model[i].weight.clone() for i in (3, 4)}
    init_weights(model, "dirac")
    x = torch.randn(2, 4, 5, 5)
    h = model[0](x)
    assert torch.allclose(h[:, :4], x, atol=1e-6)  # the first 4 of 8 filters copy the 4 inputs
    assert model[0].weight[4:].abs().sum() > 0  # the rest keep the layer's own random initialization
    assert torch.allclose(model[1](h), h[:, :4], atol=1e-6)  # 8 -> 4: each output copies an input channel
    y = torch.randn(2, 6, 5, 5)
    assert torch.allclose(model[2](y), y, atol=1e-6)  # depthwise: every filter is an identity
    assert all(torch.equal(model[i].weight, before[i]) for i in (3, 4))  # even kernels and linear layers untouched
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model)


def test_lsuv_gives_every_layer_unit_output_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 10))
    x = torch.randn(512, 100) * 3
    init_weights(model, "lsuv", x)
    outs = []
    h = x
    for m in model:
        h = m(h)
        if isinstance(m, nn.Linear):
            outs.append(h.var().item())
    assert outs == pytest.approx([1.0, 1.0, 1.0], abs=0.03)
    with pytest.raises(VisrecError, match="batch of training images"):
        init_weights(model, "lsuv")


def test_bad_schemes_name_the_key_and_the_fix():
    assert parse_init("normal:0.02") == ("normal", 0.02)
    for bad, match in (("normal:-1", "positive standard deviation"), ("normal", "positive standard deviation"),
                       ("glorot", "use one of: default, normal:STD, xavier"), ("he:2", "not an initialization")):
        with pytest.raises(VisrecError, match=match):
            parse_init(bad)


def test_a_run_records_and_uses_its_init(tmp_path):
    syn = "synthetic:classes=3,size=8,train=96,test=24"
    run = visrec.train(syn, epochs=1, out=str(tmp_path / "he"), progress=False,
                       overrides={"model.init": "lsuv", "model.kwargs.widths": [8, 8, 8], "log.report": False,
                                  "train.batch_size": 32})
    assert yaml.safe_load((run.path / "config.yaml").read_text())["model"]["init"] == "lsuv"
    assert run.summary["status"] == "completed" and math.isfinite(run.summary["test_loss"])
    with pytest.raises(VisrecError, match="model.init 'bogus'"):
        visrec.train(syn, epochs=1, out=str(tmp_path / "bad"), progress=False, overrides={"model.init": "bogus"})
