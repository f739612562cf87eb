"""Semantic segmentation on scenes (64x64 canvases of 1-4 Fashion-MNIST objects on plain or textured backgrounds,
11 classes with the background): pixel accuracy and mIoU over the whole test split, per network and upsampling,
with training time on 2 CPU cores. Target: U-Net >= 0.80 mIoU within 15 minutes.

    python bench/segmentation.py [--runs unet:transpose,fcn:transpose] [--epochs 10] [--out bench/segmentation.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import visrec
from baseline import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="unet:transpose", help="model:upsampling, comma-separated")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows = []
    for spec in args.runs.split(","):
        model, up = spec.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            run = visrec.train("scenes", model=model, task="segmentation", epochs=args.epochs, out=Path(tmp) / "run",
                               progress=False, overrides={"model.kwargs.up": up, "log.report": False})
            s = run.summary
            ious = (Path(tmp) / "run" / "per_class_iou.csv").read_text()
        row = {"model": model, "up": up, "epochs": args.epochs, "test_pix_acc": s["test_pix_acc"],
               "test_miou": s["test_miou"], "train_seconds": s["train_seconds"], "params": s["params"],
               "per_class_iou": ious}
        rows.append(row)
        print(f"  {model:5s} {up:12s}: pixel accuracy {s['test_pix_acc']:.2%}, mIoU {s['test_miou']:.3f} "
              f"(target >= 0.80 for U-Net) in {s['train_seconds']:.0f} s of training, {s['params']:,} parameters",
              flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
