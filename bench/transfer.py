"""Transfer learning on Fashion-MNIST, the course's table offline: pretrain on five classes, transfer to the other five.

The network (the default recipe's convnet) is trained on T-shirt/top, Trouser, Pullover, Dress and Coat, then
transferred to Sandal, Shirt, Sneaker, Bag and Ankle boot with 10, 100 and 1000 labelled images per class, by:

    scratch    the same recipe from random weights
    linear     a linear classifier on cached features of the frozen network
    last       fine-tune the last stage (at a tenth of the lr) and a new head
    full       fine-tune everything with per-stage learning rates
    two_stage  the head alone for one epoch, then everything

Each cell is the mean test accuracy (on all 5000 test images of the five new classes) over --seeds seeds. Writes
bench/transfer.json, bench/transfer.png, and prints the table that bench/transfer.txt holds.

    python bench/transfer.py [--seeds 2] [--pretrained RUN]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import visrec
from visrec.plotting import figure_png, pyplot
from visrec.transfer import finetune

SOURCE = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
TARGET = ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
METHODS = ["scratch", "linear", "last", "full", "two_stage"]
# per labelled images per class: (batch size, epochs): about 100-400 steps each
BUDGET = {10: (25, 60), 100: (64, 30), 1000: (128, 10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--pretrained", type=Path, default=None, help="reuse a pretrained run")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="visrec-transfer-"))
    t0 = time.perf_counter()
    if args.pretrained:
        source = visrec.Run(args.pretrained)
    else:
        source = visrec.train("fashion-mnist", out=str(root / "source"), progress=False,
                              overrides={"data.classes": SOURCE})
    print(f"pretrained on {len(SOURCE)} classes: test {source.summary['test_acc']:.2%} "
          f"({source.summary['n_train']} images, {source.summary['train_seconds']:.0f} s)", flush=True)
    results: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    seconds: dict[str, dict[str, list[float]]] = {m: {} for m in METHODS}
    for per_class, (bs, epochs) in BUDGET.items():
        for seed in range(args.seeds):
            common = {"data.classes": TARGET, "data.subset": per_class * len(TARGET), "data.val_fraction": 0.02,
                      "train.batch_size": bs, "train.epochs": epochs, "train.seed": seed, "log.every": 1000}
            for method in METHODS:
                out = root / f"{method}-{per_class}-s{seed}"
                if method == "scratch":
                    run = visrec.train("fashion-mnist", out=str(out), overrides=common, progress=False)
                else:
                    run = finetune(str(source.path), "fashion-mnist", method, overrides=common, out=out, quiet=True)
                s = run.summary
                results[method].setdefault(str(per_class), []).append(s["test_acc"])
                seconds[method].setdefault(str(per_class), []).append(s["train_seconds"])
                print(f"{per_class:5d}/class seed {seed} {method:9s} test {s['test_acc']:.2%} "
                      f"({s['train_seconds']:.1f} s)", flush=True)
    print()
    header = f"{'labels per class':18s}" + "".join(f"{n:>18d}" for n in BUDGET)
    print(header)
    for m in METHODS:
        cells = []
        for n in BUDGET:
            v = results[m][str(n)]
            spread = f" ±{statistics.stdev(v) * 100:.1f}" if len(v) > 1 else ""
            cells.append(f"{statistics.mean(v):>11.2%}{spread:>7s}")
        print(f"{m:18s}" + "".join(cells))
    print("\nmean training seconds: " + ", ".join(
        f"{m} {statistics.mean(x for n in BUDGET for x in seconds[m][str(n)]):.1f}" for m in METHODS))
    best = {str(n): max(METHODS, key=lambda m: statistics.mean(results[m][str(n)])) for n in BUDGET}
    print("best per column: " + ", ".join(f"{n}/class {m}" for n, m in best.items()))
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    plot(results, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps({
        "source_classes": SOURCE, "target_classes": TARGET, "budget": {str(k): v for k, v in BUDGET.items()},
        "source_test_acc": source.summary["test_acc"], "test_acc": results, "train_seconds": seconds,
        "best": best, "seeds": args.seeds, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }, indent=2) + "\n")


def plot(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = list(BUDGET)
    for m in METHODS:
        ys = [statistics.mean(results[m][str(n)]) * 100 for n in xs]
        ax.plot(xs, ys, marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("labelled images per class (new classes)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST: 5 classes -> the other 5")
    ax.grid(alpha=0.3)
    ax.legend()
    path.write_bytes(figure_png(fig, dpi=110))


if __name__ == "__main__":
    main()
