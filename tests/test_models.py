from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visrec.errors import VisrecError
from visrec.models import create_model, list_models, model_entry

SHAPES = [(1, 28, 28, 10), (3, 32, 32, 100)]
# 8x8 inputs: every model on the meta device in test_zoo, and one model of each family for real here.
# Classifiers; the dense networks and the detectors have their own tests (test_segmentation.py, test_detection.py).
CLASSIFIERS = [n for n in list_models()
               if model_entry(n).family not in ("segmentation", "detection", "instance", "captioning", "style",
                                                "generative")]
ONE_PER_FAMILY = sorted({model_entry(n).family: n for n in CLASSIFIERS}.values())


def _forward_backward(m, c, h, w, k):
    x = torch.randn(2, c, h, w)
    out = m(x)
    assert out.shape == (2, k)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("c, h, w, k", SHAPES)
def test_every_model_forward_backward_finite(name, c, h, w, k):
    torch.manual_seed(0)
    m = create_model(name, in_chans=c, num_classes=k, image_size=(h, w))
    _forward_backward(m, c, h, w, k)
    if c == 1 and model_entry(name).family != "reference":  # the common surface (not the course's own networks)
        m.eval()
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            feats = m.forward_features(x)
            assert torch.allclose(m.forward_head(feats), m(x), atol=1e-5)
            assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
        m.reset_classifier(7)
        assert m(x).shape == (2, 7)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_one_model_per_family_trains_at_8x8(name):
    torch.manual_seed(0)
    _forward_backward(create_model(name, in_chans=1, num_classes=10, image_size=8), 1, 8, 8, 10)


def test_cifar_resnet_parameter_counts_match_the_paper():
    counts = {d: sum(p.numel() for p in create_model(f"resnet{d}", 3, 10, 32).parameters()) for d in (20, 56, 110)}
    for depth, paper in ((20, 0.27e6), (56, 0.85e6), (110, 1.7e6)):
        assert abs(counts[depth] - paper) / paper < 0.02, (depth, counts[depth])


def test_linear_and_mlp_shapes():
    lin = create_model("linear", in_chans=3, num_classes=10, image_size=32)
    assert lin.head.weight.shape == (10, 3 * 32 * 32)
    mlp = create_model("mlp", in_chans=1, num_classes=10, image_size=28, hidden=50)
    assert sum(p.numel() for p in mlp.parameters()) == 784 * 50 + 50 + 50 * 10 + 10


def test_lenet5_has_the_classic_layer_sizes():
    m = create_model("lenet5", in_chans=1, num_classes=10, image_size=28)
    n = sum(p.numel() for p in m.parameters())
    # C1 156 + C3 2416 + F5 48120 + F6 10164 + output 850 (full C3 connectivity)
    assert n == 156 + 2416 + 48120 + 10164 + 850
    assert math.isclose(n, 61706)


def test_unknown_model_and_option_errors():
    with pytest.raises(VisrecError, match="(?s)unknown model 'convnett'.*did you mean 'convnet'"):
        create_model("convnett")
    with pytest.raises(VisrecError, match="(?s)no option 'depthh'.*depth"):
        create_model("convnet", depthh=3)


def test_model_from_file(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text(
        "import torch.nn as nn\n"
        "def tiny(in_chans, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def sized(in_chans, num_classes, image_size, width=4):\n"
        "    h, w = image_size\n"
        "    return nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.Flatten(),\n"
        "                         nn.Linear(width * h * w, num_classes))\n"
        "def wrong(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))\n"
        "def softmaxed(**kw):\n"
        "    return 'not a module'\n"
    )
    m = create_model(f"{f}:tiny", in_chans=1, num_classes=5, image_size=8)
    assert m(torch.zeros(3, 1, 8, 8)).shape == (3, 5)
    m2 = create_model(f"{f}:sized", in_chans=3, num_classes=4, image_size=(6, 5), width=2)
    assert m2(torch.zeros(1, 3, 6, 5)).shape == (1, 4)
    with pytest.raises(VisrecError, match=r"returned \(2, 6\).*\(batch, 5\) logits"):
        create_model(f"{f}:wrong", in_chans=1, num_classes=5, image_size=8)
    with pytest.raises(VisrecError, match="returned str, not a torch.nn.Module"):
        create_model(f"{f}:softmaxed", in_chans=1, num_classes=5, image_size=8)
    with pytest.raises(VisrecError, match="(?s)has no function 'nope'.*tiny"):
        create_model(f"{f}:nope")
    with pytest.raises(VisrecError, match="does not exist"):
        create_model(f"{tmp_path / 'missing.py'}:f")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(VisrecError, match="broken.py failed to import: ModuleNotFoundError"):
        create_model(f"{tmp_path / 'broken.py'}:f")


def test_convnet_pools_move_the_downsampling():
    from visrec.models.summary import summary

    default = create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28))
    early = create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), pools=[1, 1, 0, 0])
    x = torch.randn(2, 1, 28, 28)
    assert default.forward_features(x).shape[2:] == early.forward_features(x).shape[2:] == (7, 7)
    assert early(x).shape == (2, 10)
    assert summary(early.eval(), (1, 28, 28)).macs < 0.5 * summary(default.eval(), (1, 28, 28)).macs
    with pytest.raises(VisrecError, match="must have 4 flags"):
        create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), pools=[1, 1])
    with pytest.raises(VisrecError, match="below one pixel"):
        create_model("convnet", in_chans=1, num_classes=10, image_size=(8, 8), pools=[1, 1, 1, 1])


def test_patch_whitening_decorrelates_the_patches_it_was_fitted_on():
    from visrec.models.layers import PatchWhitening

    torch.manual_seed(0)
    x = torch.randn(64, 3, 12, 12).cumsum(2).cumsum(3)  # strongly correlated neighbouring pixels
    layer = PatchWhitening(3, kernel_size=2)
    assert layer.out_channels == 24 and not layer.weight.requires_grad
    raw = layer(x)  # before fitting: each patch pixel and its negation
    assert torch.equal(raw[:, 0, :-1, :-1], x[:, 0, :-1, :-1]) and torch.equal(raw[:, 12], -raw[:, 0])
    layer.fit(x)
    y = layer(x)[:, :12, :-1, :-1]  # the positive half, at the positions whose patches lie inside the image
    cov = torch.cov(y.permute(1, 0, 2, 3).reshape(12, -1).double())
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.02)
    assert [p for p in layer.parameters()] == [layer.bias] and "weight" in layer.state_dict()
    with pytest.raises(VisrecError, match=r"\(N, 3, H, W\)"):
        layer.fit(torch.randn(4, 1, 8, 8))
    top = PatchWhitening(3, kernel_size=2, out_channels=8)  # the 4 directions of largest variance
    top.fit(x)
    assert torch.allclose(top.weight[:4], layer.weight[:4]) and torch.allclose(top.weight[4:], -top.weight[:4])
    y4 = top(x)[:, :4, :-1, :-1].permute(1, 0, 2, 3).reshape(4, -1).double()
    assert torch.allclose(torch.cov(y4), torch.eye(4, dtype=torch.float64), atol=0.02)
    with pytest.raises(VisrecError, match="cannot have 25 output channels"):
        PatchWhitening(3, kernel_size=2, out_channels=25)
    # A larger eps damps the directions of small variance: direction i keeps variance evals_i / (evals_i + eps).
    damped = PatchWhitening(3, kernel_size=2, eps=1.0)
    damped.fit(x)
    patches = torch.nn.functional.unfold(x.double(), 2).transpose(1, 2).reshape(-1, 12)
    evals = torch.linalg.eigvalsh(torch.cov(patches.T)).flip(0)
    yd = damped(x)[:, :12, :-1, :-1].permute(1, 0, 2, 3).reshape(12, -1).double()
    assert torch.allclose(torch.cov(yd).diagonal(), evals / (evals + 1.0), rtol=0.02, atol=1e-3)
    assert torch.cov(yd).diagonal()[-1] < 0.5  # the smallest direction is no longer amplified to unit variance


def test_convnet_whitening_stem():
    m = create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), pools=[1, 1, 0, 0], stem="whiten")
    assert m.stem[0].out_channels == 16 and m.stages[0][0].in_channels == 16  # 8 of the 9 3x3 directions, +-
    assert m.forward_features(torch.randn(2, 1, 28, 28)).shape[1:] == (64, 7, 7)
    _forward_backward(m, 1, 28, 28, 10)
    with pytest.raises(VisrecError, match="stem 'patchify' is not valid"):
        create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), stem="patchify")
    with pytest.raises(VisrecError, match=r"widths\[0\]=16 cannot be .* at most 8"):
        create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), stem="whiten", whiten_kernel=2)
    with pytest.raises(VisrecError, match="whiten_kernel=0"):
        create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), stem="whiten", whiten_kernel=0)
    eps = create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), stem="whiten", whiten_eps="0.1")
    assert eps.stem[0].eps == 0.1 and m.stem[0].eps == 5e-4
    for bad in (0, -1.0, "small"):
        with pytest.raises(VisrecError, match="whiten_eps=.* must be a number > 0"):
            create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), stem="whiten", whiten_eps=bad)


def test_a_fixed_whitening_bias_keeps_gradients_out_of_the_stem():
    kw = dict(in_chans=1, num_classes=10, image_size=(28, 28), pools=[1, 1, 0, 0], stem="whiten")
    trained, fixed = create_model("convnet", **kw), create_model("convnet", **kw, whiten_bias=False)
    assert trained.state_dict().keys() == fixed.state_dict().keys()  # checkpoints load either way
    assert "stem.0.bias" not in dict(fixed.named_parameters()) and not fixed.stem[0].bias.any()
    fixed.load_state_dict(trained.state_dict())
    x = torch.randn(4, 1, 28, 28)
    seen = {}
    for name, m in (("fixed", fixed), ("trained", trained)):
        m.stem.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.requires_grad))
        m(x).sum().backward()
    assert seen == {"fixed": False, "trained": True}  # so stage1 computes no input gradient
    assert fixed.stages[0][0].weight.grad is not None
    assert torch.allclose(fixed.eval()(x), trained.eval()(x))


@pytest.mark.parametrize("shape", [(3, 18, 28, 28), (2, 5, 7, 9), (1, 4, 2, 2)])
def test_the_2x2_max_pool_equals_max_pool2d_with_and_without_gradients(shape):
    from visrec.models.layers import MaxPool2x2

    pool = MaxPool2x2()
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(pool(x), F.max_pool2d(x, 2))  # the strided-views path, odd sizes floored alike
    xg = x.clone().requires_grad_()
    out = pool(xg)
    assert out.grad_fn is not None and torch.equal(out, F.max_pool2d(x, 2))  # max_pool2d's path where grads flow
    out.sum().backward()
    assert xg.grad.sum() == out.numel()  # one winner per window, as max_pool2d routes it


def test_the_2x2_max_pool_refuses_a_one_pixel_map_as_max_pool2d_does():
    from visrec.models.layers import MaxPool2x2

    with torch.no_grad(), pytest.raises(RuntimeError, match="too small"):
        MaxPool2x2()(torch.randn(2, 3, 1, 6))


def test_the_2x2_max_pool_exports_as_one_maxpool_node(tmp_path):
    import onnx

    from visrec.models.layers import MaxPool2x2

    net = nn.Sequential(nn.Conv2d(1, 4, 3), MaxPool2x2()).eval()
    with torch.no_grad():
        torch.onnx.export(net, (torch.randn(1, 1, 10, 10),), str(tmp_path / "m.onnx"), dynamo=True, verbose=False)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert ops.count("MaxPool") == 1 and "Max" not in ops


def test_convnet_depth_and_a_fourth_width_build_airbench_style_stages():
    kw = dict(in_chans=1, num_classes=10, image_size=(28, 28), stem="whiten", whiten_bias=False)
    m = create_model("convnet", **kw, widths=[18, 24, 32, 40], pools=[0, 1, 1, 1], depth=2)
    convs = [c for c in m.stages.modules() if isinstance(c, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(18, 24), (24, 24), (24, 32), (32, 32), (32, 40),
                                                                (40, 40)]
    assert m.head.in_features == 40 and m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    plain = create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28))
    assert plain.state_dict().keys() == create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28),
                                                     widths=[16, 32, 64, 64], depth=1).state_dict().keys()
    with pytest.raises(VisrecError, match="depth=0"):
        create_model("convnet", **kw, depth=0)
    with pytest.raises(VisrecError, match="3 or 4"):
        create_model("convnet", **kw, widths=[18, 32])


def test_grid_pooling_matches_adaptive_pooling_and_exports_to_onnx(tmp_path):
    from visrec.models.layers import GlobalPool, grid_pool

    torch.manual_seed(0)
    for h, w in [(7, 7), (8, 8), (5, 9), (3, 3), (1, 1), (14, 6)]:  # even, overlapping, uneven cells; tiny maps
        x = torch.randn(2, 3, h, w)
        for g in (2, 3, 4):
            assert torch.equal(grid_pool(x, g, "max"), F.adaptive_max_pool2d(x, g))
            assert torch.allclose(grid_pool(x, g, "avg"), F.adaptive_avg_pool2d(x, g), atol=1e-6)
    m = create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), pools=[1, 1, 0, 0], pool_grid=2)
    assert m.head.in_features == 64 * 4 and m.num_features == 256
    assert m.forward_head(m.forward_features(torch.randn(2, 1, 28, 28)), pre_logits=True).shape == (2, 256)
    _forward_backward(m, 1, 28, 28, 10)
    with pytest.raises(VisrecError, match="pool grid=0 must be >= 1"):
        create_model("convnet", in_chans=1, num_classes=10, image_size=(28, 28), pool_grid=0)

    # adaptive_max_pool2d(7x7 -> 2x2) has no ONNX export; the grid pool's ops (one strided pool, or slices) do
    ort = pytest.importorskip("onnxruntime")
    from visrec.inference import export_onnx

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = GlobalPool("max", 2), GlobalPool("avg", 3)

        def forward(self, x):  # 7x7 -> 2x2 (kernel 4, stride 3) and 5x5 -> 3x3 (uneven cells: slices)
            return torch.cat([self.a(x), self.b(x[:, :, :5, :5])], 1)

    x = torch.randn(3, 4, 7, 7)
    path = export_onnx(Both(), x, tmp_path / "pool.onnx", "x", "y", {})
    got = ort.InferenceSession(str(path)).run(None, {"x": x[:2].numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), Both()(x[:2]), atol=1e-6)
