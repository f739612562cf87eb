"""Cost of `visrec train --monitor`: the default recipe with and without the training monitor.

Same data, seed and steps; runs alternate (off, on, off, on, ...) so machine drift hits both alike.
The target: a monitored step costs at most 10% more. Prints the ratio of median training times.

    python bench/monitor_overhead.py [--images 25600] [--epochs 2] [--repeats 3] [--every 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

import visrec
from visrec.doctor import TrainingMonitor


def one(images: int, epochs: int, every: int | None, seed: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cbs = [TrainingMonitor(every, write=True)] if every else []
        run = visrec.train("fashion-mnist", epochs=epochs, seed=seed, out=Path(tmp) / "r", progress=False,
                           callbacks=cbs, overrides={"data.subset": images, "eval.tta": "none"})
        return run.summary["train_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=25600)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", default="50,10", help="sampling intervals to measure")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    everies = [int(e) for e in args.every.split(",")]
    times: dict[str, list[float]] = {"off": [], **{f"every {e}": [] for e in everies}}
    one(2560, 1, None, 0)  # warm-up: first-call costs out of the measurement
    for r in range(args.repeats):
        times["off"].append(one(args.images, args.epochs, None, r))
        for e in everies:
            times[f"every {e}"].append(one(args.images, args.epochs, e, r))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    base = statistics.median(times["off"])
    steps = args.images // 256 * args.epochs
    print(f"\ndefault recipe, {args.images} Fashion-MNIST images x {args.epochs} epochs = {steps} steps, "
          f"{args.repeats} repeats, {torch.get_num_threads()} CPU threads")
    rows = {}
    for k, v in times.items():
        med = statistics.median(v)
        rows[k] = {"median_s": med, "all_s": v, "overhead": med / base - 1}
        print(f"  monitor {k:9s} median {med:7.2f} s   overhead {med / base - 1:+.1%}")
    args.out.write_text(json.dumps({"rows": rows, "steps": steps, "torch": torch.__version__,
                                    "python": platform.python_version()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
