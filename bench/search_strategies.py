"""Random against grid search at equal trial budgets, on a fast proxy task, over several seeds.

The proxy: the default recipe's convnet on a 3000-image stratified slice of Fashion-MNIST, 2 epochs, judged by
validation accuracy (the test split is never used). The space: learning rate (log, 3 decades), weight decay
(log, 4 decades) and label smoothing; only the learning rate matters much, which is the case Bergstra and Bengio
made for random search: a grid of N trials tries N^(1/3) learning rates, random search tries N.

    python bench/search_strategies.py [--trials 9] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from visrec.tune import create_study, run_workers, trial_rows

SPACE = {"optim.lr": {"loguniform": [0.003, 3.0]}, "optim.weight_decay": {"loguniform": [1e-6, 1e-2]},
         "loss.label_smoothing": {"uniform": [0.0, 0.3]}}
PROXY = ["data.subset=3000", "train.batch_size=128"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="visrec-search-"))
    best: dict[str, list[float]] = {"random": [], "grid": []}
    lrs: dict[str, list[int]] = {"random": [], "grid": []}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for strategy in ("random", "grid"):
            spec = create_study("fashion-mnist", space=SPACE, trials=args.trials, strategy=strategy,
                                epochs=args.epochs, overrides=PROXY, out=root / f"{strategy}-{seed}",
                                study=f"{strategy}-{seed}", seed=seed, pruner="none")
            run_workers(spec, 1)
            rows = [r for r in trial_rows(spec) if r["state"] == "COMPLETE"]
            best[strategy].append(max(r["val_acc"] for r in rows))
            lrs[strategy].append(len({round(r["optim.lr"], 12) for r in rows}))
            print(f"seed {seed} {strategy:6s}: best val {best[strategy][-1]:.2%} over {len(rows)} trials "
                  f"({lrs[strategy][-1]} distinct learning rates)", flush=True)
    print()
    for s in best:
        print(f"{s:6s} best val accuracy: mean {statistics.mean(best[s]):.2%}, min {min(best[s]):.2%}, "
              f"max {max(best[s]):.2%} ({args.trials} trials x {args.seeds} seeds)")
    gap = statistics.mean(best["random"]) - statistics.mean(best["grid"])
    print(f"random - grid: {gap * 100:+.2f} pts; wall time {time.perf_counter() - t0:.0f} s")
    args.out.write_text(json.dumps({"space": SPACE, "proxy": PROXY, "trials": args.trials, "epochs": args.epochs,
                                    "best_val_acc": best, "distinct_lrs": lrs, "random_minus_grid": gap,
                                    "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
