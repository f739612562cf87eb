"""Ensembles of the default recipe on Fashion-MNIST, against their own members, in one run.

Trains N members of `visrec train fashion-mnist` (seeds 1..N, everything else default), then reports each
member's test accuracy, the probability average and the majority vote of all of them, and, for the first
member, the average of its `last` and `best` checkpoints (batch-norm statistics recomputed) against those
checkpoints alone. Target: the ensemble beats its best member.

Members are evaluated as their runs were (flip test-time augmentation, the default recipe's `eval.tta=auto`).

    python bench/ensembles.py [--members 3] [--runs RUN ...] [--out bench/ensembles.json]
    (--runs reuses trained members instead of training new ones)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import visrec
from visrec.ensemble import ensemble


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--runs", nargs="*", type=Path, default=[])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="visrec-ensembles-"))
    runs, seconds = [visrec.Run(p) for p in args.runs], []
    for r in runs:
        print(f"member {r.path.name}: test {r.summary['test_acc']:.2%} in {r.summary['train_seconds']:.0f} s")
    for seed in range(1, 0 if runs else args.members + 1):
        t = time.perf_counter()
        run = visrec.train("fashion-mnist", out=str(root / f"seed{seed}"), overrides={"train.seed": seed},
                           progress=False)
        seconds.append(time.perf_counter() - t)
        runs.append(run)
        print(f"member seed {seed}: test {run.summary['test_acc']:.2%} in {run.summary['train_seconds']:.0f} s",
              flush=True)
    t = time.perf_counter()
    rep = ensemble([str(r.path) for r in runs])
    ens_s = time.perf_counter() - t
    best = rep.best_member_acc
    for name, acc in rep.combined.items():
        print(f"{name:22s} {acc:.2%}  ({(acc - best) * 100:+.2f} pts over the best member, {best:.2%})")
    ck = ensemble([f"{runs[0].path}:last", f"{runs[0].path}:best"])
    steps = {t: json.loads((runs[0].path / "checkpoints" / f"{t}.json").read_text())["step"] for t in ("last", "best")}
    for m in ck.members:
        tag = m["member"].rsplit(":", 1)[1]
        print(f"checkpoint {tag:5s} (step {steps[tag]}) {m['acc']:.2%}")
    same = " - the best checkpoint is the last one: nothing to average" if steps["last"] == steps["best"] else ""
    print(f"checkpoint average     {ck.combined['parameter average']:.2%}  (last and best of the first member, "
          f"BN recomputed){same}")
    target = max(rep.combined["probability average"], rep.combined["majority vote"]) > best
    print(f"target (ensemble beats its best member): {'met' if target else 'NOT met'}; evaluation {ens_s:.0f} s")
    args.out.write_text(json.dumps({"ensemble": rep.to_json(), "checkpoints": ck.to_json(),
                                    "member_wall_seconds": seconds, "torch": torch.__version__,
                                    "threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
