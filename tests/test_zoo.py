"""The model zoo against torchvision and the published numbers, and the per-layer summary."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision.models as tvm
from typer.testing import CliRunner

from visrec.cli import app
from visrec.errors import VisrecError
from visrec.models import create_model, feature_maps, list_models, model_entry, model_summary
from visrec.models.layers import DropPath

TORCHVISION = ["alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
               "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "densenet121",
               "densenet161", "densenet169", "densenet201", "squeezenet1_0", "squeezenet1_1"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_parameter_counts_and_names_equal_torchvision(name):
    with torch.device("meta"):  # shapes only: building even VGG-19 costs nothing
        kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        theirs = getattr(tvm, name)(**kw)
        ours = create_model(name, in_chans=3, num_classes=1000, image_size=224)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_googlenet_with_auxiliary_heads_matches_torchvision():
    with torch.device("meta"):
        theirs = tvm.googlenet(aux_logits=True, init_weights=True)
        ours = create_model("googlenet", 3, 1000, 224, aux=True)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1", "vgg11_bn", "densenet121"])
def test_torchvision_weight_files_load_unchanged(name, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    theirs = getattr(tvm, name)().eval()
    save_file(theirs.state_dict(), str(tmp_path / "w.safetensors"))
    ours = create_model(name, 3, 1000, 224).eval()
    ours.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_resnet50_macs_match_the_published_4_1_gmacs():
    s = model_summary("resnet50", (3, 224, 224), 1000)
    assert abs(s.macs - 4.1e9) / 4.1e9 < 0.03, s.macs
    assert s.params == 25_557_032


def test_vgg16_activations_are_the_sum_of_the_course_table_rows():
    # The course's VGG-16 table, values per image: the input, each CONV3 and POOL2 output, the three FCs.
    # Its rows sum to about 15.2M (its printed TOTAL of 24M does not match its own rows).
    rows = ([224 * 224 * 3] + [224 * 224 * 64] * 2 + [112 * 112 * 64] + [112 * 112 * 128] * 2 + [56 * 56 * 128]
            + [56 * 56 * 256] * 3 + [28 * 28 * 256] + [28 * 28 * 512] * 3 + [14 * 14 * 512]
            + [14 * 14 * 512] * 3 + [7 * 7 * 512] + [4096, 4096, 1000])
    assert sum(rows) == 15_237_608
    s = model_summary("vgg16", (3, 224, 224), 1000)
    counted = [r.activations for r in s.rows if r.kind in ("input", "Conv2d", "MaxPool2d", "Linear")]
    assert counted == rows  # the same tensors, in the same order
    # Everything else writes nothing new (in-place ReLU, dropout at evaluation, flatten) except torchvision's
    # adaptive average pool to 7x7, which copies the 7x7x512 map once more: 15.26M in all.
    others = {r.kind: r.activations for r in s.rows if r.activations and r.kind not in ("input", "Conv2d",
                                                                                        "MaxPool2d", "Linear")}
    assert others == {"AdaptiveAvgPool2d": 7 * 7 * 512}
    assert s.activations == 15_237_608 + 25_088
    assert abs(s.activations - 15.2e6) / 15.2e6 < 0.01


def test_cifar_networks_have_the_papers_sizes():
    # ResNet paper table 6: 0.27M / 0.85M / 1.7M; DenseNet-BC (k=12, depth 100): 0.8M; WRN-28-10: 36.5M.
    for name, paper in (("resnet20", 0.27e6), ("resnet56", 0.85e6), ("resnet110", 1.7e6), ("densenet_bc100", 0.8e6),
                        ("wrn28_10", 36.5e6)):
        n = model_summary(name, (3, 32, 32), 10).params
        assert abs(n - paper) / paper < 0.05, (name, n)


def test_cifar_resnets_widen_by_stage_and_refuse_bad_widths():
    base = model_summary("resnet20", (1, 28, 28), 10)
    wide = model_summary("resnet20", (1, 28, 28), 10, widths=[16, 32, 128])
    # only stage 3 (7x7 maps) widens: its two 3x3 convolutions per block grow 4x, the first one's input 2x
    assert wide.params > 3 * base.params and wide.macs < 2 * base.macs
    assert create_model("resnet20", 1, 10, 28, widths=(8, 16, 24))(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    for bad in ([16, 32], [16, 0, 64], [16, 32.5, 64]):
        with pytest.raises(VisrecError, match=r"(?s)widths.*model.kwargs.widths"):
            create_model("resnet20", 1, 10, 28, widths=bad)


def test_every_model_summarizes_at_8x8_on_the_meta_device():
    for name in list_models():
        if model_entry(name).family in ("detection", "instance", "captioning", "style", "generative"):
            continue  # their proposals (detection) or vocabularies (captioning) come from the data; own tests
        s = model_summary(name, (1, 8, 8), 10)
        # a score map per class; the sliding window's last layer classifies one window per pixel
        dense = model_entry(name).family == "segmentation" and name != "sliding_window"
        assert math.prod(s.rows[-1].output_shape) == (640 if dense else 10) and s.params > 0 and s.macs > 0, name


def test_inputs_too_small_name_the_smallest_size_and_the_stem():
    with pytest.raises(VisrecError, match=r"(?s)vgg16 does not fit 28x28.*at least 32x32.*stem='small'"):
        create_model("vgg16", 1, 10, 28, stem="imagenet")
    with pytest.raises(VisrecError, match="at least 8x8"):
        create_model("squeezenet1_0", 3, 10, 4)
    for option, bad in (("stem", "huge"), ("norm", "weird"), ("act", "swishy"), ("head", "big")):
        model = "vgg11" if option == "head" else "resnet18"
        with pytest.raises(VisrecError, match=f"(?s){bad}.*(auto|batch|relu)"):
            create_model(model, 3, 10, 32, **{option: bad})


def test_stages_shrink_and_heads_reset():
    m = create_model("resnet50", 3, 10, 64).eval()
    maps = feature_maps(m, torch.randn(2, 3, 64, 64))
    assert list(maps) == ["layer1", "layer2", "layer3", "layer4"]
    sides = [v.shape[-1] for v in maps.values()]
    assert sides == sorted(sides, reverse=True) and sides[-1] < sides[0]
    m.reset_classifier(3)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_googlenet_auxiliary_heads_only_in_training():
    m = create_model("googlenet", 3, 5, 32, aux=True)
    m.train()
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and len(m.aux_outputs) == 2 and all(a.shape == (2, 5) for a in m.aux_outputs)
    m.eval()
    m(torch.randn(2, 3, 32, 32))
    assert m.aux_outputs == []


def test_stochastic_depth_grows_linearly_and_drops_whole_examples():
    m = create_model("resnet20", 1, 10, 28, drop_path=0.5)
    rates = [d.p for d in m.modules() if isinstance(d, DropPath)]
    assert len(rates) == 9 and rates[-1] == 0.5 and rates == sorted(rates) and rates[0] == pytest.approx(0.5 / 9)
    d = DropPath(0.5).train()
    y = d(torch.ones(1000, 4))
    kept = (y[:, 0] > 0)
    assert torch.all(y[kept] == 2.0) and torch.all(y[~kept] == 0) and 400 < int(kept.sum()) < 600
    with pytest.raises(VisrecError, match="drop_path"):
        create_model("resnet18", 3, 10, 32, drop_path=1.5)


def test_activation_and_norm_by_name():
    m = create_model("resnet18", 3, 10, 32, act="prelu", norm="group")
    kinds = {type(x).__name__ for x in m.modules()}
    assert "PReLU" in kinds and "GroupNorm" in kinds and "BatchNorm2d" not in kinds and "ReLU" not in kinds
    for act in ("leaky_relu", "elu", "gelu", "tanh", "sigmoid", "maxout"):
        out = create_model("mobilenet_v1", 1, 10, 28, act=act, norm="layer")(torch.randn(2, 1, 28, 28))
        assert torch.isfinite(out).all(), act


def test_models_and_summary_commands_print_json():
    r = CliRunner().invoke(app, ["models", "--input", "3x224x224", "--classes", "1000", "--family", "resnet",
                                 "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in json.loads(r.output)}
    assert rows["resnet50"]["params"] == 25_557_032 and rows["resnet50"]["family"] == "resnet"
    assert abs(rows["resnet50"]["macs"] - 4.09e9) < 0.01e9
    r = CliRunner().invoke(app, ["summary", "resnet20", "--input", "3x32x32", "--classes", "10", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert {"params", "macs", "activations", "layers"} <= set(s) and s["params"] == 269_722
    assert s["layers"][0]["name"] == "input" and s["layers"][-1]["output_shape"] == [10]
    r = CliRunner().invoke(app, ["summary", "alexnet", "--input", "1x28x28", "-o", "stem=imagenet"])
    assert r.exit_code != 0 and "at least 63x63" in str(r.exception)


def test_timm_models_when_installed():
    if not _has_timm():
        with pytest.raises(VisrecError, match="pip install timm"):
            create_model("timm:resnet18", 3, 10, 32)
        return
    m = create_model("timm:resnet18", 3, 10, 32)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10) and feature_maps(m, torch.randn(2, 3, 32, 32))


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True
