"""Object detection on scenes (64x64 canvases, 1-4 Fashion-MNIST objects): a two-stage model (Faster R-CNN) and
single-stage ones (RetinaNet, FCOS) on the same data and the same ResNet-18 backbone, each given about the same
training time, scored by pycocotools on the test split: mAP@[.5:.95], mAP@.5 (target >= 0.85 and >= 0.60 for
Faster R-CNN within 30 minutes), AR@100, and milliseconds per test image; plus the evaluator's own time on the
full test split. 2 CPU cores unless a GPU is there.

    python bench/detection.py [--models fasterrcnn_resnet18:3,retinanet_resnet18:6] [--scenes 10000]
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
    ap.add_argument("--models", default="fasterrcnn_resnet18:3,retinanet_resnet18:4,fcos_resnet18:4",
                    help="MODEL:EPOCHS, comma-separated")
    ap.add_argument("--scenes", type=int, default=10_000)
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every model")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows = []
    for spec in args.models.split(","):
        name, epochs = spec.split(":") if ":" in spec else (spec, "3")
        with tempfile.TemporaryDirectory() as tmp:
            run = visrec.train("scenes", model=name, task="detection", epochs=int(epochs), out=Path(tmp) / "run",
                               progress=False, overrides=[f"data.scene_count={args.scenes}", "log.report=false",
                                                          *args.set])
            s = run.summary
            ev = json.loads((run.path / "summary.json").read_text())
            per_class = (run.path / "per_class_ap.csv").read_text()
        row = {"model": name, "epochs": int(epochs), "scenes": args.scenes, "test_map": s["test_map"],
               "test_map50": s["test_map50"], "test_map75": s["test_map75"], "test_ar100": s["test_ar100"],
               "ms_per_image": s["test_ms_per_image"], "train_seconds": s["train_seconds"],
               "n_test": s["n_test"], "eval_seconds": s.get("test_seconds"), "min_size": ev.get("min_size"),
               "object_sizes": ev.get("object_sizes"), "per_class_ap": per_class}
        rows.append(row)
        print(f"  {name:22s} {epochs:>2s} ep: mAP {s['test_map']:.3f}  mAP@.5 {s['test_map50']:.3f}  "
              f"mAP@.75 {s['test_map75']:.3f}  AR@100 {s['test_ar100']:.3f}  {s['test_ms_per_image']:.1f} ms/image  "
              f"trained {s['train_seconds'] / 60:.1f} min; pycocotools on {s['n_test']} test images "
              f"{(s.get('test_seconds') or {}).get('coco_eval', float('nan')):.1f} s", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
