"""Classic baselines: losses to the formula, gradients to finite differences, kNN to a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch

from visrec.classic import KNN, LinearClassifier, TwoLayerNet, cross_validate_k, extract, softmax_loss, svm_loss
from visrec.classic.features import color_histogram, hog
from visrec.classic.knn import vote
from visrec.classic.twolayer import twolayer_loss
from visrec.errors import VisrecError


def _data(n=40, d=7, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("c", [2, 10, 100])
def test_zero_weights_give_ln_c_and_c_minus_1(c):
    X, y = _data(c=c)
    W, b = torch.zeros(X.shape[1], c, dtype=X.dtype), torch.zeros(c, dtype=X.dtype)
    assert softmax_loss(W, b, X, y, reg=1.0)[0].item() == pytest.approx(math.log(c), abs=1e-12)
    assert svm_loss(W, b, X, y, reg=1.0, delta=1.0)[0].item() == pytest.approx(c - 1, abs=1e-12)


def _rel_err_of_gradients(f, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], h=1e-5, coords=30):
    # h=1e-5: in float64 the roundoff of a smaller step (about 1e-16 * |f| / h) starts to dominate.
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for name, p in params.items():
        flat = p.view(-1)
        for i in torch.randperm(flat.numel(), generator=g)[:coords].tolist():
            old = flat[i].item()
            flat[i] = old + h
            fp = f()
            flat[i] = old - h
            fm = f()
            flat[i] = old
            num = (fp - fm) / (2 * h)
            ana = grads[name].reshape(-1)[i].item()
            if max(abs(num), abs(ana)) > 1e-10:
                worst = max(worst, abs(num - ana) / max(abs(num), abs(ana)))
    return worst


@pytest.mark.parametrize("reg_type", ["l2", "l1", "elastic"])
@pytest.mark.parametrize("kind", ["svm", "softmax"])
def test_linear_gradients_match_finite_differences(kind, reg_type):
    X, y = _data()
    g = torch.Generator().manual_seed(2)
    W = torch.randn(X.shape[1], 5, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(5, generator=g, dtype=torch.float64) * 0.1
    fn = svm_loss if kind == "svm" else softmax_loss
    _, dW, db = fn(W, b, X, y, reg=0.3, reg_type=reg_type)
    err = _rel_err_of_gradients(lambda: fn(W, b, X, y, reg=0.3, reg_type=reg_type)[0].item(), {"W": W, "b": b},
                                {"W": dW, "b": db})
    assert err < 1e-7


def test_twolayer_gradients_match_finite_differences():
    X, y = _data(d=6)
    g = torch.Generator().manual_seed(3)
    params = {"W1": torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.5,
              "b1": torch.randn(8, generator=g, dtype=torch.float64) * 0.1,
              "W2": torch.randn(8, 5, generator=g, dtype=torch.float64) * 0.5,
              "b2": torch.randn(5, generator=g, dtype=torch.float64) * 0.1}
    _, grads = twolayer_loss(params, X, y, reg=0.05)
    assert _rel_err_of_gradients(lambda: twolayer_loss(params, X, y, 0.05)[0].item(), params, grads) < 1e-7


def _brute_knn(train_x, train_y, test_x, k, metric, c):
    from visrec.classic import distances

    preds = []
    for q in test_x:
        if metric == "l2":
            d = ((train_x - q) ** 2).sum(1)
        elif metric == "l1":
            d = (train_x - q).abs().sum(1)
        else:  # float cosines can differ in the last bit between kernels: use the very same numbers
            d = distances(test_x, train_x, "cosine")[len(preds)]
        order = sorted(range(len(d)), key=lambda i: (d[i].item(), i))[:k]
        labels = [int(train_y[i]) for i in order]
        counts = {lab: labels.count(lab) for lab in labels}
        top = max(counts.values())
        preds.append(next(lab for lab in labels if counts[lab] == top))  # tie: the class met first
    return torch.tensor(preds)


@pytest.mark.parametrize("metric", ["l2", "l1", "cosine"])
def test_knn_equals_brute_force_with_ties(metric):
    # Small integer coordinates make many exactly equal distances and tied votes.
    g = torch.Generator().manual_seed(4)
    tx = torch.randint(0, 3, (60, 4), generator=g).float()
    ty = torch.randint(0, 4, (60,), generator=g)
    qx = torch.randint(0, 3, (25, 4), generator=g).float() + (1 if metric == "cosine" else 0)
    model = KNN(metric, chunk=7 if metric != "cosine" else 1000).fit(tx + (1 if metric == "cosine" else 0), ty, 4)
    for k in (1, 2, 4, 7):
        assert torch.equal(model.predict(qx, k), _brute_knn(model.train_x, ty, qx, k, metric, 4)), k


def test_vote_breaks_ties_by_nearness():
    # k=4, two votes each for classes 3 and 1: class 1 has the nearest member.
    assert vote(torch.tensor([[1, 3, 3, 1]]), 5).item() == 1
    assert vote(torch.tensor([[3, 1, 1, 3]]), 5).item() == 3
    assert vote(torch.tensor([[2, 0, 0]]), 3).item() == 0


def test_cross_validation_recovers_the_best_k():
    # Two interleaved clusters with 20% label noise: k=1 copies the noise, large k averages it away.
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 2, (400,), generator=g)
    x = y[:, None].float() * 3 + torch.randn(400, 2, generator=g)
    noisy = y.clone()
    flip = torch.rand(400, generator=g) < 0.2
    noisy[flip] = 1 - noisy[flip]
    res = cross_validate_k(x, noisy, [1, 15], folds=5)
    assert res.best_k == 15 and res.mean(15) > res.mean(1) + 0.05
    assert len(res.fold_acc[1]) == 5 and res.std(1) >= 0


def test_linear_and_twolayer_learn_separable_data():
    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.nn.functional.one_hot(y, 3).float() * 2 + 0.3 * torch.randn(300, 3, generator=g)
    for kind in ("svm", "softmax"):
        m = LinearClassifier(kind, reg=1e-4).fit(x, y, 3, lr=0.1, epochs=10, batch_size=32)
        assert (m.predict(x) == y).float().mean() > 0.95
    net = TwoLayerNet(hidden=16).fit(x, y, 3, lr=0.05, epochs=10, batch_size=32)
    assert (net.predict(x) == y).float().mean() > 0.95


def test_hog_and_color_features():
    img = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    img[0, :, :, 8:] = 255  # a vertical edge: horizontal gradient, orientation bin 0
    img[1, 0] = 255  # pure red: hue 0
    h = hog(img, cell=4, bins=9)
    assert h.shape == (2, 9 * 4 * 4)
    cells = h[0].view(9, 4, 4)
    assert cells[0].sum() > 0 and cells[1:].sum() == 0
    col = color_histogram(img, bins=10)
    assert col[1, 0] == pytest.approx(1.0) and col[0].sum() == pytest.approx(0.0)  # white has no hue


def test_features_are_cached_on_disk(tmp_path):
    imgs = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    a = extract(imgs, "hog+color")
    files = list((tmp_path / "cache" / "visrec" / "features").glob("*.safetensors"))
    assert len(files) == 1
    assert torch.equal(extract(imgs, "hog+color"), a)


def test_bad_input_names_the_value():
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    with pytest.raises(VisrecError, match="k=11"):
        KNN().fit(x, y).predict(x, 11)
    with pytest.raises(VisrecError, match="dimension 3"):
        KNN().fit(x, y).predict(torch.randn(2, 3), 1)
    with pytest.raises(VisrecError, match="non-finite.*lr=1e\\+30"):
        LinearClassifier("softmax").fit(x * 1e20, y, 2, lr=1e30, epochs=2)
    with pytest.raises(VisrecError, match="features"):
        extract(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "sift")
    with pytest.raises(VisrecError, match="k=50"):
        cross_validate_k(x, y, [1, 50], folds=2)


def test_baseline_cli_writes_a_run_folder_and_json():
    import json

    from typer.testing import CliRunner

    from visrec.cli import app

    res = CliRunner().invoke(app, ["baseline", "digits", "--method", "knn", "--k", "1,3,5", "--folds", "3",
                                   "--out", "b", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert {"method", "features", "test_acc", "seconds"} <= set(s)
    assert s["method"] == "knn" and s["k"] in (1, 3, 5) and s["test_acc"] > 0.9  # digits: about 98%
    assert len(s["cv"]["table"]) == 3 and len(s["cv"]["table"][0]["folds"]) == 3
    from pathlib import Path

    for name in ("cv.png", "confusion.png", "summary.json", "per_class.csv"):
        assert (Path("b") / name).exists(), name


@pytest.mark.parametrize("method", ["svm", "softmax", "twolayer"])
def test_baseline_learned_methods_on_digits(method):
    from visrec.classic import baseline

    s = baseline("digits", method=method, features="raw", lrs=[1e-2, 1e-1], regs=[1e-4], epochs=8, out="b")
    assert s["test_acc"] > 0.85 and s["lr"] in (1e-2, 1e-1)
    if method != "twolayer":
        from pathlib import Path

        assert (Path("b") / "templates.png").exists()


def test_baseline_hog_features_and_bad_k():
    from visrec.classic import baseline

    s = baseline("synthetic:classes=3,size=16,train=120,test=60", method="softmax", features="hog+color",
                 lrs=[0.1], regs=[1e-4], epochs=5, out="h")
    assert s["feature_dim"] == 9 * 8 * 8 + 10  # 16 px, 2-px cells
    with pytest.raises(VisrecError, match="k=500"):
        baseline("synthetic:classes=3,size=8,train=120,test=30", method="knn", ks=[1, 500], out="k")


def test_compiled_l1_kernel_matches_cdist():
    from visrec.classic.knn import l1_distances

    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 256, (300, 64), generator=g).float()
    t = torch.randint(0, 256, (11000, 64), generator=g).float()  # large enough to take the compiled path
    assert torch.equal(l1_distances(q, t), torch.cdist(q, t, p=1))


@pytest.mark.parametrize("metric,shape", [("l2", None), ("l1", (1, 8, 8)), ("l1", None)])
def test_pruned_knn_finds_the_same_neighbours(metric, shape):
    # Clustered integer data: the lower bounds prune most pairs, distances are exact in float32 (so the
    # two paths agree bit for bit), and many distances tie, so the tie rule is exercised across the prune.
    g = torch.Generator().manual_seed(11)
    coarse = torch.randint(0, 30, (12, 1, 2, 2), generator=g)  # images made of 4x4 flat blocks
    centers = torch.nn.functional.interpolate(coarse.float(), scale_factor=4).long().flatten(1)
    labels = torch.randint(0, 12, (2600,), generator=g)
    x = (centers[labels] + torch.randint(-1, 2, (2600, 64), generator=g)).float()
    tx, ty, qx = x[:2400], labels[:2400] % 5, x[2400:]
    exhaustive = KNN(metric, prune=False).fit(tx, ty, 5)
    pruned = KNN(metric, prune=True, image_shape=shape, chunk=64).fit(tx, ty, 5)
    for k in (1, 4, 9):
        assert torch.equal(pruned.neighbors(qx, k), exhaustive.neighbors(qx, k)), k
    found = pruned._pruned_distances(qx[:64], 4)
    assert found is not None and found[0].shape[1] < 2400 // 4  # the bounds did prune


def test_pruned_knn_falls_back_when_bounds_are_loose():
    g = torch.Generator().manual_seed(12)
    tx, qx = torch.randint(0, 4, (1000, 40), generator=g).float(), torch.randint(0, 4, (30, 40), generator=g).float()
    ty = torch.randint(0, 3, (1000,), generator=g)
    exhaustive = KNN("l2", prune=False).fit(tx, ty, 3)
    pruned = KNN("l2", prune=True).fit(tx, ty, 3)
    assert torch.equal(pruned.neighbors(qx, 3), exhaustive.neighbors(qx, 3))
    with pytest.raises(VisrecError, match="image_shape"):
        KNN("l1", image_shape=(3, 8, 8)).fit(tx, ty)


def test_newtons_softmax_reaches_the_optimum_lbfgs_finds():
    from visrec.classic.linear import LinearClassifier, softmax_loss

    g = torch.Generator().manual_seed(0)
    n, d, k = 300, 12, 4
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (X[:, :k] + 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64)).argmax(1)
    newton = LinearClassifier("softmax", reg=1e-2).fit_newton(X, y, k)
    assert len(newton.history) <= 15 and newton.history == sorted(newton.history, reverse=True)
    _, dW, db = softmax_loss(newton.W, newton.b, X, y, 1e-2)
    assert float(dW.abs().max()) < 1e-8 and float(db.abs().max()) < 1e-8  # the optimum: the gradient vanishes
    W = torch.zeros(d, k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, y) + 1e-2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(newton.W, W.detach(), atol=1e-6) and torch.allclose(newton.b, b.detach(), atol=1e-6)
    with pytest.raises(VisrecError, match="Hessian"):
        LinearClassifier("softmax").fit_newton(torch.randn(10, 800), torch.zeros(10, dtype=torch.long), 10)


def test_the_softmax_baseline_solves_with_newton(tmp_path):
    from visrec.classic import baseline

    s = baseline("digits", method="softmax", solver="newton", regs=[1e-3, 1e-2], subset=400, out=tmp_path / "n")
    assert s["solver"] == "newton" and 1 <= s["newton_steps"] <= 30
    assert len(s["newton_step_seconds"]) == s["newton_steps"]
    assert s["newton_losses"] == sorted(s["newton_losses"], reverse=True) and s["test_acc"] > 0.85
    with pytest.raises(VisrecError, match="--solver newton is for --method softmax"):
        baseline("synthetic:classes=3,size=6,train=150,test=30", method="svm", solver="newton", out=tmp_path / "s")
