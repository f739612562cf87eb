"""The course's training claims, measured with visrec's knobs on real data (2-core CPU): one row per claim, with the
experiment, the numbers and a verdict (confirmed / refuted / depends).

    python bench/playbook.py [--out bench/playbook.json]

Rows: initialization statistics (bench/init_statistics.py), L-BFGS against Adam on full-batch problems, Newton
against SGD for softmax regression, DropConnect against dropout, gradient noise on a deep plain network, PCA and
whitening against per-channel normalization (linear classifier and the default convnet), color jitter and PCA color
on color images (scenes:shapes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import visrec
from baseline import machine
from init_statistics import stds

FULL_BATCH = {"train.batch_size": 100_000, "train.min_epoch_steps": 0, "data.augment": [], "loss.label_smoothing": 0.0,
              "schedule.name": "constant", "optim.weight_decay": 1e-3, "log.report": False, "eval.tta": "none",
              "data.val_fraction": 0.0}


def train_losses(run) -> list[tuple[float, float]]:
    """(training seconds, train loss) at the end of each epoch."""
    return [(r["seconds"], r["loss"]) for r in run.metrics("train") if r.get("kind") == "epoch"]


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, loss in curve if loss <= target), None)


def lbfgs_vs_adam(tmp: Path, model: str, kwargs: dict) -> dict:
    base = {**FULL_BATCH, "model.kwargs": kwargs}
    lb = visrec.train("digits", model=model, epochs=25, out=str(tmp / f"lbfgs-{model}"), progress=False,
                      overrides={**base, "optim.name": "lbfgs", "optim.lr": 1.0})
    ad = visrec.train("digits", model=model, epochs=400, out=str(tmp / f"adam-{model}"), progress=False,
                      overrides={**base, "optim.name": "adam", "optim.lr": 0.01})
    c_lb, c_ad = train_losses(lb), train_losses(ad)
    best = min(min(v for _, v in c_lb), min(v for _, v in c_ad))
    target = best * 1.01 + 1e-4
    t_lb, t_ad = time_to(c_lb, target), time_to(c_ad, target)
    return {"model": model, "target_loss": target, "lbfgs_seconds": t_lb, "adam_seconds": t_ad,
            "lbfgs_total_seconds": c_lb[-1][0], "adam_total_seconds": c_ad[-1][0],
            "lbfgs_final": c_lb[-1][1], "adam_final": c_ad[-1][1], "lbfgs_epochs": len(c_lb), "adam_epochs": len(c_ad)}


def newton_vs_sgd() -> dict:
    import torch
    from sklearn.datasets import load_digits

    from visrec.classic.linear import LinearClassifier, softmax_loss

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-3)
    y = torch.tensor(d.target)
    t0 = time.perf_counter()
    newton = LinearClassifier("softmax", reg=1e-3).fit_newton(X, y, 10)
    t_newton = time.perf_counter() - t0
    optimum = newton.history[-1]
    sgd = LinearClassifier("softmax", reg=1e-3)
    reached, t_sgd, epochs = None, 0.0, 0
    for epochs in range(1, 201):  # one epoch at a time, each continuing from the last weights
        t0 = time.perf_counter()
        if epochs == 1:
            sgd.fit(X, y, 10, lr=0.5, epochs=1, batch_size=64, lr_decay=1.0)
        else:
            w, b = sgd.W, sgd.b
            perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(epochs))
            for idx in perm.split(64):
                _, dW, db = softmax_loss(w, b, X[idx], y[idx], 1e-3)
                w -= 0.5 / (1 + epochs / 20) * dW
                b -= 0.5 / (1 + epochs / 20) * db
        t_sgd += time.perf_counter() - t0
        loss = float(softmax_loss(sgd.W.double(), sgd.b.double(), X.double(), y, 1e-3)[0])
        if loss <= optimum * 1.01:
            reached = epochs
            break
    return {"newton_steps": len(newton.history), "newton_seconds": t_newton, "optimum": optimum,
            "sgd_epochs_to_1pct": reached, "sgd_seconds": t_sgd, "sgd_final_loss": loss, "sgd_epochs_run": epochs}


def fmnist(tmp: Path, name: str, epochs: int, model: str = "mlp", **over) -> dict:
    run = visrec.train("fashion-mnist", model=model, epochs=epochs, out=str(tmp / name), progress=False,
                       overrides={"data.subset": 10_000, "log.report": False, "data.augment": [], **over})
    s = run.summary
    return {"name": name, "test_acc": s["test_acc"], "train_seconds": s["train_seconds"],
            "final_train_loss": train_losses(run)[-1][1]}


def whitening_rows(tmp: Path, row) -> None:
    """PCA / PCA-whitening / ZCA against per-channel normalization: the course says whitening is rarely needed for
    convnets, and that PCA keeps most of the signal in few dimensions."""
    lin = {m: fmnist(tmp, f"linear-{m}", 10, model="linear", **{"data.normalize": m})
           for m in ("channel", "pca", "pca_whiten", "zca")}
    best = max(lin.values(), key=lambda r: r["test_acc"])
    ch = lin["channel"]["test_acc"]
    row("PCA/whitening against per-channel normalization, linear classifier (10,000 Fashion-MNIST images, 10 "
        "epochs, the default recipe)", "confirmed" if best["test_acc"] > ch + 0.003 else
        ("refuted" if best["test_acc"] < ch - 0.003 else "depends"),
        "test accuracy: " + ", ".join(f"{m} {r['test_acc']:.2%}" for m, r in lin.items())
        + "; final train loss " + " / ".join(f"{r['final_train_loss']:.3f}" for r in lin.values())
        + " (pca keeps the components holding 95% of the variance)", "bench/playbook.txt")
    conv = {m: fmnist(tmp, f"convnet-{m}", 3, model="convnet", **{"data.normalize": m}) for m in ("channel", "zca")}
    d = conv["zca"]["test_acc"] - conv["channel"]["test_acc"]
    row("Whitening adds little for a convnet over per-channel normalization (default convnet, 10,000 Fashion-MNIST "
        "images, 3 epochs)", "confirmed" if abs(d) <= 0.005 or d < 0 else "refuted",
        f"test accuracy: channel {conv['channel']['test_acc']:.2%}, zca {conv['zca']['test_acc']:.2%} "
        f"({100 * d:+.2f} points); training {conv['channel']['train_seconds']:.0f} s / "
        f"{conv['zca']['train_seconds']:.0f} s", "bench/playbook.txt")


def color_rows(tmp: Path, row) -> None:
    """Color jitter and AlexNet's PCA color augmentation on color images (no CIFAR-10 offline: scenes:shapes,
    colored circles, squares and triangles on colored noise, classified by their largest shape)."""
    data = {"data.scene_size": 32, "data.scene_count": 4000, "log.report": False, "eval.tta": "none"}
    runs = {}
    for name, aug in (("flip", ["hflip"]), ("flip+color_jitter", ["hflip", "color_jitter:0.4,0.4,0.4,0.1"]),
                      ("flip+pca_color", ["hflip", "pca_color:0.1"])):
        r = visrec.train("scenes:shapes", model="convnet", epochs=8, out=str(tmp / f"color-{name}"), progress=False,
                         overrides={**data, "data.augment": aug})
        runs[name] = r.summary
    base = runs["flip"]["test_acc"]
    gains = {k: v["test_acc"] - base for k, v in runs.items() if k != "flip"}
    verdict = ("confirmed" if min(gains.values()) > 0.003 else
               "refuted" if max(gains.values()) < -0.003 else "depends")
    row("Color jitter and PCA color augmentation improve accuracy on color images (default convnet, scenes:shapes "
        "32x32, 4,000 training scenes, 8 epochs)", verdict,
        "test accuracy: " + ", ".join(f"{k} {v['test_acc']:.2%}" for k, v in runs.items())
        + "; train accuracy " + " / ".join(f"{v.get('train_acc', float('nan')):.2%}" for v in runs.values()),
        "bench/playbook.txt")


def _secs(reached: float | None, total: float) -> str:
    return f"{reached:.3f} s" if reached is not None else f"not within {total:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows = []

    def row(claim: str, verdict: str, numbers: str, source: str) -> None:
        rows.append({"claim": claim, "verdict": verdict, "numbers": numbers, "source": source})
        print(f"[{verdict}] {claim}\n    {numbers}", flush=True)

    tanh_small, tanh_x = stds("tanh", "normal:0.01"), stds("tanh", "xavier")
    relu_x, relu_he = stds("relu", "xavier"), stds("relu", "he")
    row("Small random init (N(0, 0.01^2)) collapses activations through 10 tanh layers; Xavier keeps them",
        "confirmed", f"std at layer 1 -> 10: small {tanh_small[0]:.3g} -> {tanh_small[-1]:.2g}; Xavier "
        f"{tanh_x[0]:.2f} -> {tanh_x[-1]:.2f}", "bench/init_statistics.txt")
    row("With ReLU, Xavier halves the variance per layer; He (the factor 2) keeps it", "confirmed",
        f"Xavier {relu_x[0]:.2f} -> {relu_x[-1]:.3f} (x{(relu_x[-1] / relu_x[0]) ** (1 / 9):.2f} std per layer); "
        f"He {relu_he[0]:.2f} -> {relu_he[-1]:.2f}", "bench/init_statistics.txt")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for model, kw in (("linear", {}), ("mlp", {"hidden": 64})):
            r = lbfgs_vs_adam(tmp, model, kw)
            faster = r["lbfgs_seconds"] is not None and (r["adam_seconds"] is None or
                                                         r["lbfgs_seconds"] < r["adam_seconds"])
            row(f"Full batch, no noise: L-BFGS reaches the loss sooner than Adam ({model} on digits)",
                "confirmed" if faster else "refuted",
                f"time to train loss {r['target_loss']:.4f} (1% above the best seen): L-BFGS "
                f"{_secs(r['lbfgs_seconds'], r['lbfgs_total_seconds'])} ({r['lbfgs_epochs']} steps of up to 20 "
                f"iterations, final {r['lbfgs_final']:.4f}), Adam (lr 0.01) "
                f"{_secs(r['adam_seconds'], r['adam_total_seconds'])} ({r['adam_epochs']} full-batch steps, final "
                f"{r['adam_final']:.4f})",
                "bench/playbook.txt")
        n = newton_vs_sgd()
        row("Newton's method needs a handful of steps where SGD needs many (softmax regression, digits)",
            "confirmed" if n["newton_steps"] <= 15 else "refuted",
            f"Newton: {n['newton_steps']} steps, {n['newton_seconds']:.2f} s to loss {n['optimum']:.4f}; SGD "
            f"(batch 64, lr 0.5 decaying): {n['sgd_epochs_to_1pct'] or 'not'} epochs to within 1% "
            f"({n['sgd_seconds']:.2f} s, {n['sgd_epochs_run']} run, final {n['sgd_final_loss']:.4f})",
            "bench/playbook.txt")
        base = {"model.kwargs": {"hidden": 512, "depth": 3}}
        none = fmnist(tmp, "none", 15, **base)
        drop = fmnist(tmp, "dropout", 15, **{"model.kwargs": {"hidden": 512, "depth": 3, "dropout": 0.3}})
        dc = fmnist(tmp, "dropconnect", 15, **{"model.kwargs": {"hidden": 512, "depth": 3, "dropconnect": 0.3}})
        best = max((none, drop, dc), key=lambda r: r["test_acc"])
        row("DropConnect regularizes like dropout (MLP 512x3, 10,000 Fashion-MNIST images, 15 epochs)",
            "confirmed" if dc["test_acc"] >= none["test_acc"] else "refuted",
            f"test accuracy: none {none['test_acc']:.2%}, dropout 0.3 {drop['test_acc']:.2%}, DropConnect 0.3 "
            f"{dc['test_acc']:.2%} (best: {best['name']}); train loss {none['final_train_loss']:.3f} / "
            f"{drop['final_train_loss']:.3f} / {dc['final_train_loss']:.3f}", "bench/playbook.txt")
        # 20 tanh layers of 50 units, default init, no normalization, plain SGD: a network that does not train
        deep = {"model.kwargs": {"hidden": 50, "depth": 20, "act": "tanh"}, "optim.name": "sgd", "optim.lr": 0.05,
                "optim.weight_decay": 0.0}
        quiet = fmnist(tmp, "deep", 10, **deep)
        small = fmnist(tmp, "deep-noise-0.01", 10, **deep, **{"optim.grad_noise": 0.01})
        big = fmnist(tmp, "deep-noise-0.3", 10, **deep, **{"optim.grad_noise": 0.3})
        best_noisy = max(small["test_acc"], big["test_acc"])
        row("Annealed gradient noise helps a deep plain network train (20 tanh layers of 50, no normalization, "
            "plain SGD, 10 epochs)", "confirmed" if best_noisy > quiet["test_acc"] + 0.005 else
            ("refuted" if best_noisy < quiet["test_acc"] - 0.005 else "depends"),
            f"test accuracy without noise {quiet['test_acc']:.2%}, eta 0.01 {small['test_acc']:.2%}, eta 0.3 "
            f"{big['test_acc']:.2%}; train loss {quiet['final_train_loss']:.3f} / {small['final_train_loss']:.3f} / "
            f"{big['final_train_loss']:.3f}", "bench/playbook.txt")
        whitening_rows(tmp, row)
        color_rows(tmp, row)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
