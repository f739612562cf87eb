"""Semantic segmentation on scenes (64x64 canvases of 1-4 Fashion-MNIST objects on plain or textured backgrounds,
11 classes with the background): pixel accuracy and mIoU over the whole test split, per network and upsampling,
with training time and inference milliseconds per test image on 2 CPU cores. Target: U-Net >= 0.80 mIoU within
15 minutes. The lecture's ideas side by side on the same images: a sliding window classifying each center pixel,
convolutions at full resolution, and fully convolutional encoder-decoders with each upsampling.

    python bench/segmentation.py [--runs unet:transpose:10,fcn:nearest:3,sliding_window::1] [--scenes 10000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import visrec
from baseline import machine
from visrec.evaluate import predict_logits


def inference_ms(run, n: int = 200) -> float:
    """Milliseconds per image of the trained network on the first n test images (batches of 50)."""
    from visrec.tasks import task_of_run

    _, ds = task_of_run(run)
    lm = run.load_model()
    x = ds.test.images[:n]
    predict_logits(lm.model, x[:8], lm.normalizer)  # warm-up
    t0 = time.perf_counter()
    with torch.no_grad():
        predict_logits(lm.model, x, lm.normalizer, batch_size=50)
    return 1000 * (time.perf_counter() - t0) / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="unet:transpose:10", help="model:upsampling:epochs, comma-separated")
    ap.add_argument("--scenes", type=int, default=10_000, help="training scenes (data.scene_count)")
    ap.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every run")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows = []
    for spec in args.runs.split(","):
        model, up, epochs = (spec.split(":") + ["", "10"])[:3]
        sets = [f"data.scene_count={args.scenes}", "log.report=false", *args.set]
        if up:
            sets.append(f"model.kwargs.up={up}")
        with tempfile.TemporaryDirectory() as tmp:
            run = visrec.train("scenes", model=model, task="segmentation", epochs=int(epochs),
                               out=Path(tmp) / "run", progress=False, overrides=sets)
            s = run.summary
            ms = inference_ms(run)
        row = {"model": model, "up": up or None, "epochs": int(epochs), "scenes": args.scenes,
               "test_pix_acc": s["test_pix_acc"], "test_miou": s["test_miou"], "train_seconds": s["train_seconds"],
               "params": s["params"], "inference_ms_per_image": round(ms, 3)}
        rows.append(row)
        print(f"  {model:14s} {up or '-':12s} {epochs:>2s} ep: pixel accuracy {s['test_pix_acc']:.2%}, mIoU "
              f"{s['test_miou']:.3f} in {s['train_seconds']:.0f} s of training; {ms:.2f} ms per test image; "
              f"{s['params']:,} parameters", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
