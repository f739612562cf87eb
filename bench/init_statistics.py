"""The course's claim on initialization, measured: activation statistics through 10 layers of 500 units on unit
Gaussian inputs (the lecture's experiment). With tanh, small random numbers (N(0, 0.01^2)) collapse the activations
to zero layer by layer while Xavier keeps them; with ReLU, Xavier halves the variance at every layer while He (the
factor of 2) keeps it. Also LSUV and orthogonal. Prints the per-layer standard deviation and writes a figure.

    python bench/init_statistics.py [--out bench/init_statistics.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from baseline import machine
from visrec.models.init import init_weights


def stds(act: str, scheme: str, layers: int = 10, width: int = 500, n: int = 1000, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    f = nn.Tanh if act == "tanh" else nn.ReLU
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), f())])
    x = torch.randn(n, width)
    init_weights(model, scheme, x)
    out, h = [], x
    with torch.no_grad():
        for m in model:
            h = m(h)
            if isinstance(m, f):
                out.append(float(h.std()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows = {}
    for act in ("tanh", "relu"):
        for scheme in ("normal:0.01", "xavier", "he", "orthogonal", "lsuv"):
            s = stds(act, scheme)
            rows[f"{act} {scheme}"] = s
            print(f"{act:4s} {scheme:11s} std of layers 1..10: " + " ".join(f"{v:.3g}" for v in s)
                  + f"   (last/first {s[-1] / s[0]:.3g})", flush=True)
    claims = [
        ("tanh, small random numbers: activations collapse", rows["tanh normal:0.01"][-1] < 1e-6),
        ("tanh, Xavier keeps them (last layer's std within 3x of the first's)",
         rows["tanh xavier"][-1] > rows["tanh xavier"][0] / 3),
        ("ReLU, Xavier halves the variance per layer (std ratio per layer about 0.71)",
         abs((rows["relu xavier"][-1] / rows["relu xavier"][0]) ** (1 / 9) - 2 ** -0.5) < 0.1),
        ("ReLU, He keeps it (last within 2x of first)", rows["relu he"][-1] > rows["relu he"][0] / 2),
    ]
    for text, ok in claims:
        print(f"  {'confirmed' if ok else 'REFUTED'}: {text}", flush=True)
    from visrec.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, act in zip(axes, ("tanh", "relu"), strict=True):
        for key, s in rows.items():
            if key.startswith(act):
                ax.semilogy(range(1, 11), [max(v, 1e-30) for v in s], marker="o", label=key.split(" ", 1)[1])
        ax.set_title(f"{act}: std of each layer's activations")
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=90)
    args.out.write_text(json.dumps({"machine": machine(), "stds": rows,
                                    "claims": [{"claim": t, "confirmed": ok} for t, ok in claims]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
