"""Training across processes on this 2-core machine: one process with 2 threads against two processes with one
thread each (gloo, DistributedDataParallel), on the default job's model and recipe, and one process with one
thread on the half batch each rank computes, which isolates what the collectives and the second process cost.

    python bench/distributed.py [--subset 20000] [--epochs 2]

Two processes cannot be faster than two threads on two cores: this measures the overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from baseline import machine


def run(tmp: Path, name: str, epochs: int, subset: int, batch: int, threads: int, nproc: int) -> dict:
    out = tmp / name
    cmd = [sys.executable, "-m", "visrec", "train", "fashion-mnist", "--epochs", str(epochs), "--out", str(out),
           "--batch-size", str(batch), "--set", f"data.subset={subset}", "--set", "log.report=false",
           "--set", "eval.tta=none", "--set", f"device.threads={threads}", "--json"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(r["seconds"], r["acc"]) for r in recs if r["split"] == "val" and r["kind"] == "epoch"]
    return {"name": name, "test_acc": s["test_acc"], "train_seconds": s["train_seconds"],
            "images_per_s": s["images_per_s"], "steps": s["steps"], "val_by_seconds": val,
            "seconds_per_step": s["train_seconds"] / s["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subset", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        one = run(tmp, "1 process x 2 threads, batch 256", args.epochs, args.subset, 256, 2, 1)
        two = run(tmp, "2 processes x 1 thread, global batch 256", args.epochs, args.subset, 256, 1, 2)
        half = run(tmp, "1 process x 1 thread, batch 128 (one rank's share)", 1, args.subset, 128, 1, 1)
    for r in (one, two, half):
        val = ", ".join(f"{a:.2%} at {s:.0f} s" for s, a in r["val_by_seconds"])
        print(f"{r['name']}: {r['images_per_s']:,.0f} images/s, {1e3 * r['seconds_per_step']:.0f} ms/step; "
              f"test {r['test_acc']:.2%}; validation {val}", flush=True)
    ratio = one["images_per_s"] / two["images_per_s"]
    overhead = two["seconds_per_step"] - half["seconds_per_step"] * (128 / 128)
    print(f"2 processes take {ratio:.2f}x the time of 1 process with 2 threads (same global batch, same steps); "
          f"a rank's step costs {1e3 * two['seconds_per_step']:.0f} ms against {1e3 * half['seconds_per_step']:.0f} ms "
          f"for the same half batch alone: {1e3 * overhead:.0f} ms ({overhead / two['seconds_per_step']:.0%}) per step "
          "for the gradient all-reduce (gloo), the window's loss reduction and the two processes sharing the machine")
    args.out.write_text(json.dumps({"machine": machine(), "runs": [one, two, half]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
