"""Where a training step's time goes: the torch profiler over a short Trainer run of a preset's recipe, operators
grouped into convolution, batch norm, pooling, activation, optimizer and the rest.

    python bench/profile_step.py [--presets default,fmnist-fast] [--images 15000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from torch.profiler import profile

import visrec
from baseline import machine
from visrec.config import resolve_config

GROUPS = (("convolution", ("convolution",)), ("batch norm", ("batch_norm",)), ("pooling", ("pool",)),
          ("activation", ("relu", "threshold", "clamp_min")), ("optimizer", ("sgd", "_foreach")),
          ("zero fill", ("fill_", "zero_")))


def group(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other")


def profile_preset(preset: str, images: int) -> dict:
    cfg = resolve_config(preset, ["train.epochs=1", f"data.subset={images}", "log.report=false",
                                  "log.histograms=0", "eval.tta=none"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = visrec.Trainer(cfg, out=Path(tmp) / "run", progress=False)
        with profile() as prof:
            summary = trainer.fit(test=False).summary
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") or ev.key.startswith("Optimizer"):
            totals[group(ev.key)] = totals.get(group(ev.key), 0.0) + ev.self_cpu_time_total
    all_us = sum(totals.values())
    shares = {k: v / all_us for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    print(f"{preset}: {summary['steps']} steps, {summary['images_per_s']:.0f} images/s under the profiler")
    for k, v in shares.items():
        print(f"  {k:12s} {v:6.1%}")
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    print(top)
    return {"preset": preset, "shares": shares, "images_per_s": summary["images_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="default,fmnist-fast")
    ap.add_argument("--images", type=int, default=15000)
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    for p in args.presets.split(","):
        profile_preset(p.strip(), args.images)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
