"""The whole kNN command, as a user times it, against scikit-learn's kNN fit and predict on the same data.

visrec: `visrec baseline fashion-mnist --method knn` in a fresh process (imports, data, k chosen by 5-fold
cross-validation over 1, 3, 5, 10, test predictions, the run folder), wall clock. scikit-learn:
`KNeighborsClassifier(5, n_jobs=-1)` fit and predict on the same raw pixels (float32), data already in memory.
Target: the command in at most half of scikit-learn's time.

    python bench/knn_command.py [--reps 2] [--out bench/knn_command.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from baseline import machine


def visrec_command() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(sys.executable).with_name("visrec")
        t0 = time.perf_counter()
        out = subprocess.run([str(exe), "baseline", "fashion-mnist", "--method", "knn", "--out", f"{tmp}/knn",
                              "--json"], capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - t0
    return wall, json.loads(out)["test_acc"]


def sklearn_knn() -> tuple[float, float]:
    from sklearn.neighbors import KNeighborsClassifier

    import visrec

    ds = visrec.load_dataset("fashion-mnist", val_fraction=0.0)
    xtr = ds.train.images.flatten(1).float().numpy()
    xte = ds.test.images.flatten(1).float().numpy()
    ytr, yte = ds.train.labels.numpy(), ds.test.labels.numpy()
    t0 = time.perf_counter()
    pred = KNeighborsClassifier(5, n_jobs=-1).fit(xtr, ytr).predict(xte)
    return time.perf_counter() - t0, float(np.mean(pred == yte))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    ours, theirs = [], []
    for rep in range(args.reps):
        w, acc = visrec_command()
        ours.append(w)
        print(f"  rep {rep + 1} visrec baseline --method knn: {w:6.1f} s wall, test {acc:.2%}", flush=True)
        s, sacc = sklearn_knn()
        theirs.append(s)
        print(f"  rep {rep + 1} scikit-learn kNN(5) fit+predict: {s:6.1f} s, test {sacc:.2%}", flush=True)
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"\nvisrec command {statistics.median(ours):.1f} s wall against scikit-learn "
          f"{statistics.median(theirs):.1f} s: {ratio:.2f}x (target <= 0.5x)")
    args.out.write_text(json.dumps({"machine": machine(), "visrec_wall_s": ours, "sklearn_s": theirs,
                                    "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
