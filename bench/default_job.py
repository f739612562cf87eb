"""The default job against a plain PyTorch loop, on the same machine in the same run.

visrec: `visrec train fashion-mnist` (the default recipe) for several seeds: test accuracy and
training time (evaluation excluded). Baseline: the loop users write by hand from PyTorch's MNIST
example (DataLoader over tensors, batch 64, the 2-conv network with dropout, Adadelta lr 1.0 with
StepLR 0.7), 3 epochs, test accuracy after each epoch with evaluation outside the timed region.

    python bench/default_job.py [--seeds 0,1,2] [--baseline-epochs 3] [--out bench/default_job.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import visrec
from baseline import machine, plain_loop


def visrec_default(seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = visrec.train("fashion-mnist", seed=seed, out=Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - t0
        s = run.summary
    print(f"  visrec default seed {seed}: {s['train_seconds']:7.1f} s  test {s['test_acc']:.2%}  "
          f"({s['images_per_s']:.0f} img/s, {wall:.0f} s wall)", flush=True)
    return {"seed": seed, "train_seconds": s["train_seconds"], "test_acc": s["test_acc"], "wall_seconds": wall,
            "images_per_s": s["images_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--baseline-epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"machine: {machine()}", flush=True)
    print("baseline (plain PyTorch loop):", flush=True)
    base = plain_loop(args.baseline_epochs)
    print("visrec default job:", flush=True)
    runs = [visrec_default(s) for s in seeds]
    accs = [r["test_acc"] for r in runs]
    secs = [r["train_seconds"] for r in runs]
    result = {
        "machine": machine(),
        "baseline": base,
        "visrec": {"runs": runs, "test_acc_mean": statistics.mean(accs),
                   "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   "train_seconds_mean": statistics.mean(secs),
                   "train_seconds_std": statistics.stdev(secs) if len(secs) > 1 else 0.0},
    }
    result["ratio_train_seconds"] = result["visrec"]["train_seconds_mean"] / base["train_seconds"]
    v = result["visrec"]
    print(f"\nvisrec default: {v['test_acc_mean']:.2%} +- {v['test_acc_std']:.2%} test accuracy in "
          f"{v['train_seconds_mean']:.1f} +- {v['train_seconds_std']:.1f} s ({len(seeds)} seeds)")
    print(f"plain loop:     {base['test_acc']:.2%} test accuracy in {base['train_seconds']:.1f} s "
          f"({args.baseline_epochs} epochs)")
    print(f"ratio: visrec's training time is {result['ratio_train_seconds']:.2f}x the plain loop's; its test "
          f"accuracy is {(v['test_acc_mean'] - base['test_acc']) * 100:+.2f} points against the loop's")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
