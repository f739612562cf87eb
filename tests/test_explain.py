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
                        overrides={"train.batch_size": 32, "train.min_epoch_steps": 0,
                                   "model.kwargs.widths": [8, 16, 16]})


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
    with pytest.raises(VisrecError) as e:
        explain(trained, "gradcm")
    assert "did you mean 'gradcam'?" in e.value.hint
    with pytest.raises(VisrecError) as e:
        explain(trained, "saliency", target="clas2")
    assert "did you mean 'class2'?" in e.value.hint
    # image files go through the run's own decoding
    from PIL import Image

    f = tmp_path / "one.png"
    Image.fromarray(visrec.load_dataset(SYN).test.images[0, 0].numpy(), "L").save(f)
    assert explain(trained, "gradcam", images=[str(f)]).maps.shape == (1, 16, 16)
    with pytest.raises(VisrecError, match="has no layer 'stages.9'"):
        explain(trained, "gradcam", layer="stages.9", n=2)
    flat = create_model("mlp", in_chans=1, num_classes=3, image_size=(8, 8)).eval()
    with pytest.raises(VisrecError, match="needs spatial feature maps"):
        attribute("gradcam", flat, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))


def test_class_model_images_are_recognized_as_their_class(trained):
    from visrec.explain.synthesis import class_model, pixel_bounds

    lm = trained.load_model()
    classes = torch.arange(4)
    shape = (lm.in_chans, *lm.image_size)
    x = class_model(lm.model, classes, lm.normalizer, shape, steps=60, seed=0)
    lo, hi = pixel_bounds(lm.normalizer, tuple(x.shape))
    assert (x >= lo - 1e-5).all() and (x <= hi + 1e-5).all()  # valid pixels only
    with torch.no_grad():
        p = lm.model(x).softmax(1)
        noise = lm.model(torch.randn(4, *shape) * 0.1).softmax(1)
    assert (p.argmax(1) == classes).all(), p
    assert p.diagonal().mean() > noise.gather(1, classes[:, None]).mean() + 0.3


def test_fooling_flips_predictions_with_a_change_smaller_than_the_nearest_target_image(trained):
    from visrec.explain.synthesis import fooling

    lm = trained.load_model()
    ds = visrec.load_dataset(SYN)
    x8 = ds.test.images[:8]
    x = lm.normalizer(x8)
    with torch.no_grad():
        pred = lm.model(x).argmax(1)
    target = (pred + 1) % 4
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = fooling(lm.model, x, target, lm.normalizer, step=0.25)
    with torch.no_grad():
        after = lm.model(res.images).argmax(1)
    assert all(res.fooled) and torch.equal(after, target)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    train = ds.train.images.flatten(1).float()
    for k in range(len(x)):  # a real image of the target class is much further away than the attack's change
        same = train[ds.train.labels == target[k]]
        nearest = (same - x8[k].flatten().float()).norm(dim=1).min()
        assert res.l2[k] < 0.5 * nearest, (k, res.l2[k], float(nearest))


def test_feature_inversion_of_an_early_stage_resembles_its_image(trained):
    from visrec.explain.synthesis import invert, to_pixels

    lm = trained.load_model()
    x = lm.normalizer(visrec.load_dataset(SYN).test.images[:4])
    rec = invert(lm.model, x, "stem", lm.normalizer, steps=150)
    a, b = to_pixels(rec, lm.normalizer).flatten(1), to_pixels(x, lm.normalizer).flatten(1)
    corr = torch.corrcoef(torch.cat([a, b]))[:4, 4:]  # reconstruction i against original j
    assert (corr.diagonal() > 0.5).all(), corr
    assert (corr.diagonal() > corr.masked_fill(torch.eye(4, dtype=torch.bool), -1).amax(1)).all()


def test_confused_pairs_counts_mistakes():
    from visrec.explain.run import confused_pairs

    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([1, 1, 0, 0, 1, 1, 2, 0])
    assert confused_pairs(labels, pred, 3, 3) == [(0, 1, 2), (1, 0, 1), (2, 0, 1)]
    assert confused_pairs(labels, labels, 3, 3) == []


def test_synthesis_figures_and_their_bad_input(trained):
    for method in ("class_model", "fooling", "confused"):
        r = CliRunner().invoke(app, ["explain", str(trained.path), "--method", method, "--n", "3"])
        assert r.exit_code == 0, r.output
        assert (trained.path / "explain" / f"{method}.png").stat().st_size > 2000
    inv = explain(trained, "inversion", n=2, steps=30)
    assert len(inv.images) == 2 * 4 and (trained.path / "explain" / "inversion.png").stat().st_size > 2000
    one = explain(trained, "class_model", target="class1", steps=20)
    assert one.targets == [1] and len(one.images) == 1
    fooled = explain(trained, "fooling", target=3, n=4)
    assert all(t == 3 for t in fooled.targets) and "linf" in fooled.info
    with pytest.raises(VisrecError, match="no stage 'stages.7'") as e:
        explain(trained, "inversion", layer="stages.7", n=1)
    assert "stem" in e.value.hint
    with pytest.raises(VisrecError, match="no class 'zebra'"):
        explain(trained, "fooling", target="zebra")
