"""Train every shipped preset on Fashion-MNIST once and record test accuracy and training time.

The table it prints is the README's preset table. Each run is a fresh process state in this one
process, one after another, so timings do not overlap.

    python bench/presets.py [--presets default,quick,...] [--seed 0] [--out bench/presets.json] [--merge]

With --merge, rows for presets measured earlier (in --out) are kept unless measured again.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

import visrec
from visrec.config import list_presets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    gpu = torch.cuda.is_available()  # GPU presets (fmnist-gpu) run by bench/gpu.sh, on a GPU
    ap.add_argument("--presets", default=",".join(p for p in list_presets() if gpu or not p.endswith("-gpu")))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    ap.add_argument("--merge", action="store_true", help="keep earlier rows of --out for presets not run now")
    args = ap.parse_args()
    rows = []
    earlier = json.loads(args.out.read_text())["rows"] if args.merge and args.out.exists() else []
    for name in args.presets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            run = visrec.train(args.dataset, preset=name, seed=args.seed, out=Path(tmp) / "run", progress=False)
            s = run.summary
        rows.append({"preset": name, "model": s["model"], "params": s["params"], "epochs": s["epochs"],
                     "test_acc": s["test_acc"], "train_seconds": s["train_seconds"], "images_per_s": s["images_per_s"]})
        print(f"{name:10s} {s['model']:10s} {s['test_acc']:.2%}  {s['train_seconds']:7.1f} s", flush=True)
    run_now = {r["preset"] for r in rows}
    order = list(list_presets())
    rows = sorted([r for r in earlier if r["preset"] not in run_now] + rows,
                  key=lambda r: order.index(r["preset"]) if r["preset"] in order else len(order))
    machine = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "visrec": visrec.__version__, "dataset": args.dataset,
               "seed": args.seed}
    print("\n| preset | model | params | epochs | test accuracy | training time |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['preset']}` | {r['model']} | {r['params']:,} | {r['epochs']} | {r['test_acc']:.2%} | "
              f"{r['train_seconds']:.0f} s |")
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
