"""Explanations: every method on several model families, the sanity checks (model randomization, deletion), and
the command's bad input."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn
from typer.testing import CliRunner

import visrec
from visrec.cli import app
from visrec.errors import VisrecError
from visrec.explain import METHODS, attribute, explain
from visrec.models import create_model

SYN = "synthetic:classes=4,size=16,train=512,test=128"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "run"
    return visrec.train(SYN, epochs=6, out=str(out), progress=False,
                        overrides={"train.batch_size": 32, "model.kwargs.widths": [8, 16, 16]})


@pytest.mark.parametrize("name", ["convnet", "resnet18", "vgg11_bn", "mobilenet_v1", "densenet_bc100"])
def test_every_method_works_on_each_family(name):
    torch.manual_seed(0)
    model = create_model(name, in_chans=3, num_classes=5, image_size=(32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in METHODS:
        opts = {"samples": 2} if method == "smoothgrad" else {"patch": 8, "stride": 8} if method == "occlusion" else {}
        m = attribute(method, model, x, target, **opts)
        assert m.shape == (2, 32, 32) and torch.isfinite(m).all(), method
        assert method == "occlusion" or (m >= 0).all(), method  # occlusion may raise a score: signed
        assert method == "occlusion" or m.abs().sum() > 0, method  # a random net's probabilities may not move
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not model.training  # nothing changed
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def _randomized(model: nn.Module) -> nn.Module:
    import copy

    rnd = copy.deepcopy(model)
    torch.manual_seed(123)
    for m in rnd.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return rnd.eval()


@pytest.mark.parametrize("method", ["saliency", "gradcam", "guided_backprop"])
def test_maps_change_when_the_weights_are_randomized(trained, method):
    lm = trained.load_model()
    x = lm.normalizer(visrec.load_dataset(SYN).test.images[:16])
    target = lm.model(x).argmax(1)
    a = attribute(method, lm.model, x, target)
    b = attribute(method, _randomized(lm.model), x, target)
    rho = [stats.spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(len(x))]
    rho = torch.tensor(rho).nan_to_num(0.0)
    assert rho.mean() < 0.5, f"{method} maps barely depend on the weights (mean rank correlation {rho.mean():.2f})"


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_deleting_top_ranked_pixels_first_lowers_the_score_faster(trained, method):
    lm = trained.load_model()
    x = lm.normalizer(visrec.load_dataset(SYN).test.images[:32])
    target = lm.model(x).argmax(1)
    maps = attribute(method, lm.model, x, target)
    n, _, h, w = x.shape
    g = torch.Generator().manual_seed(0)

    def curve(order: torch.Tensor) -> float:  # mean class probability as ever more pixels are zeroed
        scores = []
        for frac in (0.1, 0.2, 0.3, 0.4, 0.5):
            k = int(frac * h * w)
            mask = torch.ones(n, h * w)
            mask.scatter_(1, order[:, :k], 0.0)
            with torch.no_grad():
                p = lm.model(x * mask.view(n, 1, h, w)).softmax(1).gather(1, target[:, None])
            scores.append(p.mean().item())
        return sum(scores) / len(scores)

    ranked = curve(maps.flatten(1).argsort(1, descending=True))
    shuffled = curve(torch.stack([torch.randperm(h * w, generator=g) for _ in range(n)]))
    assert ranked < shuffled, f"{method}: deleting by rank {ranked:.3f} vs at random {shuffled:.3f}"


def test_explain_writes_figures_and_reports_bad_input(trained, tmp_path):
    for method in ("filters", "activations", "errors", "tsne", "gradcam", "smoothgrad"):
        r = CliRunner().invoke(app, ["explain", str(trained.path), "--method", method, "--n", "4"])
        assert r.exit_code == 0, r.output
        assert (trained.path / "explain" / f"{method}.png").stat().st_size > 2000
    near = explain(trained, "neighbors", n=8)
    by_features, by_pixels = near.probs  # fraction of neighbours of the query's class
    assert by_features >= max(by_pixels, 0.75)  # the features find the query's class at least as well as pixels
    errors = explain(trained, "errors", n=5)
    assert len(errors.images) <= 5 and errors.probs == sorted(errors.probs, reverse=True)  # most confident first
    ex = explain(trained, "saliency", target="class2", n=4)
    assert ex.targets == [2, 2, 2, 2] and ex.maps.shape == (4, 16, 16)
    with pytest.raises(VisrecError, match="no class 'shoe'") as e:
        explain(trained, "saliency", target="shoe")
    assert "class0" in e.value.hint
    with pytest.raises(VisrecError, match="class index 9"):
        explain(trained, "saliency", target=9)
    with pytest.raises(VisrecError, match="xray"):
        explain(trained, "xray")
    with pytest.raises(VisrecError, match="has no layer 'stages.9'"):
        explain(trained, "gradcam", layer="stages.9", n=2)
    flat = create_model("mlp", in_chans=1, num_classes=3, image_size=(8, 8)).eval()
    with pytest.raises(VisrecError, match="needs spatial feature maps"):
        attribute("gradcam", flat, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
