"""Mask R-CNN (maskrcnn_resnet18, the instance task's recipe) on scenes:shapes, the data of the Mask R-CNN
shapes demo (which reports 0.95 mAP@.5): box and mask mAP on the test split, 2 CPU cores.

    python bench/shapes.py
"""

import json
import tempfile
from pathlib import Path

import visrec
from baseline import machine

print(f"machine: {machine()}", flush=True)
with tempfile.TemporaryDirectory() as tmp:
    run = visrec.train("scenes:shapes", task="instance", epochs=3, out=Path(tmp) / "run", progress=False,
                       overrides=["data.scene_count=1000", "log.report=false"])
    s = run.summary
row = {k: s[k] for k in ("test_map", "test_map50", "test_map75", "test_mask_map", "test_mask_map50", "test_ar100",
                         "test_ms_per_image", "train_seconds", "n_train", "n_test", "model")}
print(f"  {s['model']} on scenes:shapes (1,000 scenes, 3 epochs, {s['train_seconds'] / 60:.1f} min): box mAP "
      f"{s['test_map']:.3f}, mAP@.5 {s['test_map50']:.3f}; mask mAP {s['test_mask_map']:.3f}, mask mAP@.5 "
      f"{s['test_mask_map50']:.3f} (the Mask R-CNN shapes demo reports 0.95 mAP@.5)", flush=True)
Path("shapes.json").write_text(json.dumps({"machine": machine(), "rows": [row]}, indent=2) + "\n")
