"""Classification + localization on one-object scenes (64x64 canvases, one Fashion-MNIST object each, scaled
0.5-1.5x on plain or textured backgrounds): test accuracy, mean IoU and the share with the class right and IoU >= 0.5
(target >= 0.90), per box loss, on 2 CPU cores.

    python bench/localization.py [--epochs 15] [--losses smooth_l1,giou] [--out bench/localization.json]
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
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--model", default="convnet")
    ap.add_argument("--losses", default="smooth_l1,giou")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows = []
    for loss in args.losses.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            run = visrec.train("scenes", model=args.model, task="localization", epochs=args.epochs,
                               out=Path(tmp) / "run", progress=False,
                               overrides={"data.max_objects": 1, "task.box_loss": loss, "log.report": False,
                                          "data.augment": ["hflip"]})
            s = run.summary
        row = {"box_loss": loss, "model": args.model, "epochs": args.epochs, "test_acc": s["test_acc"],
               "test_iou": s["test_iou"], "test_loc_acc": s["test_loc_acc"], "train_seconds": s["train_seconds"]}
        rows.append(row)
        print(f"  {args.model} {loss:9s}: class {s['test_acc']:.2%}, mean IoU {s['test_iou']:.3f}, class right and "
              f"IoU >= 0.5 {s['test_loc_acc']:.2%} (target >= 90%) in {s['train_seconds']:.0f} s", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
