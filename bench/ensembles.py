"""Ensembles, weight averaging, distillation and test-time augmentation of the default recipe on Fashion-MNIST.

Parts (all by default, in one process):

    members   N members of `visrec train fashion-mnist` (seeds 1..N, everything else default): each member, their
              probability average and majority vote. Target: the ensemble beats its best member.
    averaging the default recipe (seed 1) with an EMA of the weights (decay 0.998) and SWA over the last quarter
              (10 snapshots per epoch, schedule unchanged): raw against EMA against SWA on val and test. With
              averaging that does not change training, its raw weights are member 1's.
    snapshots one run of the same length with a cyclic cosine schedule (4 cycles): each snapshot, the snapshot
              ensemble and the snapshots' parameter average.
    distill   one student (the default recipe, seed 4) trained on the members' soft targets (T=4, alpha=0.5).
    tta       member 1 under every test-time augmentation mode, with its cost.

Members are evaluated as their runs were (flip test-time augmentation, the default recipe's `eval.tta=auto`).

    python bench/ensembles.py [--members 3] [--runs RUN ...] [--parts members,averaging,...]
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
    ap.add_argument("--parts", default="members,averaging,snapshots,distill,tta")
    ap.add_argument("--cycles", type=int, default=4, help="snapshots: cosine cycles")
    ap.add_argument("--warmup", type=float, default=0.0, help="snapshots: warmup epochs before the first cycle")
    ap.add_argument("--swa-lr", type=float, default=0.0, help="averaging: lr held during SWA (fraction of lr)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
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
    target = max(rep.combined["probability average"], rep.combined["majority vote"]) > best
    print(f"target (ensemble beats its best member): {'met' if target else 'NOT met'}; evaluation {ens_s:.0f} s")
    doc = {"ensemble": rep.to_json(), "member_wall_seconds": seconds}
    if "averaging" in parts:
        run = visrec.train("fashion-mnist", out=str(root / "averaging"), progress=False,
                           overrides={"train.seed": 1, "average.ema": 0.998, "average.swa": 0.25,
                                      "average.swa_every": 21, "average.swa_lr": args.swa_lr})
        cmp = run.summary["weights_compared"]
        for name, v in cmp.items():
            print(f"weights {name:4s} val {v['val_acc']:.2%} test {v['test_acc']:.2%}  "
                  f"({(v['test_acc'] - cmp['raw']['test_acc']) * 100:+.2f} pts test over raw)", flush=True)
        doc[f"averaging_swa_lr{args.swa_lr:g}"] = {"weights_compared": cmp, "swa_lr": args.swa_lr,
                                                   "train_seconds": run.summary["train_seconds"]}
    if "snapshots" in parts:
        run = visrec.train("fashion-mnist", out=str(root / "snapshots"), progress=False,
                           overrides={"train.seed": 1, "schedule.name": "cyclic_cosine", "schedule.cycles": args.cycles,
                                      "schedule.warmup_epochs": args.warmup})
        snap = ensemble([f"{run.path}:snapshots"])
        for m in snap.members:
            print(f"snapshot {m['member'].rsplit(':', 1)[1]:10s} test {m['acc']:.2%}")
        for name, acc in snap.combined.items():
            print(f"snapshot {name:22s} {acc:.2%}  ({(acc - snap.members[-1]['acc']) * 100:+.2f} pts over the last "
                  f"snapshot, {(acc - best) * 100:+.2f} over the best independent member)", flush=True)
        doc[f"snapshots_{args.cycles}cycles_warmup{args.warmup:g}"] = {**snap.to_json(),
                                                                     "train_seconds": run.summary["train_seconds"]}
    if "distill" in parts:
        t = time.perf_counter()
        student = visrec.train("fashion-mnist", out=str(root / "student"), progress=False,
                               overrides={"train.seed": 4, "distill.teachers": [str(r.path) for r in runs]})
        s = student.summary
        mean_member = sum(m["acc"] for m in rep.members) / len(rep.members)
        ens = rep.combined["probability average"]
        kept = (s["test_acc"] - mean_member) / (ens - mean_member) if ens > mean_member else float("nan")
        print(f"distilled student      {s['test_acc']:.2%}  (members' mean {mean_member:.2%}, ensemble {ens:.2%}: "
              f"keeps {kept:.0%} of the ensemble's gain; {s['train_seconds']:.0f} s training, "
              f"{time.perf_counter() - t:.0f} s wall)", flush=True)
        doc["distill"] = {"student_test_acc": s["test_acc"], "members_mean": mean_member, "ensemble": ens,
                          "fraction_of_gain_kept": kept, "train_seconds": s["train_seconds"]}
    if "tta" in parts:
        rows = [row for row, _ in runs[0].compare_tta()]
        for row in rows:
            print(f"tta {row['tta']:12s} {row['views']:2d} views  test {row['acc']:.2%}  {row['seconds']:.1f} s "
                  f"({row['seconds'] / rows[0]['seconds']:.1f}x)")
        doc["tta"] = rows
    doc.update(torch=torch.__version__, threads=torch.get_num_threads())
    old = json.loads(args.out.read_text()) if args.out.is_file() and args.parts != ap.get_default("parts") else {}
    args.out.write_text(json.dumps({**old, **doc}, indent=2) + "\n")  # a partial run adds to the last full one


if __name__ == "__main__":
    main()
