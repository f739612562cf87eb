"""GAN updates compared at equal training time on Fashion-MNIST: today's joint step (one optimizer; the generator's
loss through a gradient-free copy of the critic) against alternating updates with two optimizers and the two
time-scale update rule (task.gan_update=alternating; the generator at optim.lr, the critic at 2x: Heusel et al.
2017), all DCGAN (latent 64, width 64), both judged by FID and KID over the default Fashion-MNIST convnet's
features, the same 1,000 samples, in one run.

    python bench/gan_update.py [--minutes 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import visrec

ARMS = {
    "joint (today: one optimizer, lr 2e-4)": {},
    "alternating, same lr (2e-4 both)": {"task.gan_update": "alternating"},
    "alternating + TTUR (G 2e-4, critic 4e-4)": {"task.gan_update": "alternating", "task.critic_lr_scale": 2.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="training time of each arm")
    ap.add_argument("--quick", action="store_true", help="a smoke run: checks the script only")
    args = ap.parse_args()
    budget = "20s" if args.quick else f"{args.minutes:g}m"
    extra = {"data.subset": 2000, "eval.samples": 100} if args.quick else {}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, python {sys.version.split()[0]}", flush=True)
    print(f"DCGAN on Fashion-MNIST, {budget} of training per arm (train.time_budget), FID/KID on "
          f"{extra.get('eval.samples', 1000)} samples", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, over) in enumerate(ARMS.items()):
            t = time.perf_counter()
            run = visrec.train("fashion-mnist", task="generate", model="dcgan", epochs=50, out=str(Path(tmp) / str(i)),
                               progress=False, overrides={"model.kwargs": {"latent": 64, "width": 64},
                                                          "train.time_budget": budget, "log.report": False,
                                                          **extra, **over})
            s = run.summary
            rows.append((label, s))
            print(f"   {label:44s} FID {s['test_fid']:7.2f}  KID {s['test_kid']:.4f}  classes "
                  f"{s.get('test_classes_present')}/10  {s['steps']:,} steps in {s['train_seconds']:.0f} s "
                  f"({time.perf_counter() - t:.0f} s with evaluation)", flush=True)
    base = rows[0][1]["test_fid"]
    for label, s in rows[1:]:
        print(f"   {label}: FID {s['test_fid']:.2f} vs joint {base:.2f}: "
              f"{'better' if s['test_fid'] < base else 'worse'} by {abs(s['test_fid'] - base) / base:.0%}", flush=True)
    print(json.dumps({label: {k: s.get(f"test_{k}") for k in ("fid", "kid")} for label, s in rows}))


if __name__ == "__main__":
    main()
