"""Evaluation batch size on the CPU: `evaluate.predict_logits` at the automatic batch (`eval.batch_size=0`) against
the old fixed 1024, and the neighbouring powers of two, for the models the presets train (the default convnet,
fmnist-fast's whitened convnet, ResNet-20) at Fashion-MNIST's 1x28x28 and CIFAR's 3x32x32, untrained weights
(the speed does not depend on them). Each rate is the best of `--repeats` passes over the same images, measured
in one process and interleaved, so the machine's drift touches every batch size alike.

    python bench/eval_batch.py [--images 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from baseline import machine
from visrec.data.preprocess import Normalizer
from visrec.evaluate import eval_batch_size, predict_logits
from visrec.models import create_model

MODELS = {
    "convnet (default)": ("convnet", {}),
    "convnet (fmnist-fast)": ("convnet", {"stem": "whiten", "whiten_kernel": 3, "whiten_bias": False,
                                          "widths": [18, 32, 64], "pools": [1, 1, 0, 0], "pool_grid": 2}),
    "resnet20": ("resnet20", {}),
}
SHAPES = [(1, 28, 28), (3, 32, 32)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {"machine": machine(), "images": args.images, "rows": []}
    print(f"machine: {res['machine']}\n{args.images} images per pass, best of {args.repeats} passes, "
          "flip test-time augmentation off", flush=True)
    for shape in SHAPES:
        auto = eval_batch_size(0, "cpu", shape)
        sizes = sorted({auto // 2, auto, auto * 2, 256, 1024} - {0})
        images = torch.randint(0, 256, (args.images, *shape), dtype=torch.uint8)
        norm = Normalizer("channel", torch.full((shape[0], 1, 1), 127.0), torch.full((shape[0], 1, 1), 64.0))
        for label, (name, kwargs) in MODELS.items():
            if name == "convnet" and kwargs.get("stem") == "whiten" and shape[0] != 1:
                continue  # the whitening stem's 18 channels are fmnist-fast's, for one input channel
            model = create_model(name, in_chans=shape[0], num_classes=10, image_size=shape[1], **kwargs).eval()
            best = dict.fromkeys(sizes, 0.0)
            for _ in range(args.repeats):
                for bs in sizes:
                    predict_logits(model, images[:bs], norm, batch_size=bs)  # warm-up at this shape
                    t = time.perf_counter()
                    predict_logits(model, images, norm, batch_size=bs)
                    best[bs] = max(best[bs], len(images) / (time.perf_counter() - t))
            row = {"model": label, "shape": "x".join(map(str, shape)), "auto": auto,
                   "images_per_s": {str(b): round(r) for b, r in best.items()},
                   "auto_vs_1024": best[auto] / best[1024]}
            res["rows"].append(row)
            rates = "  ".join(f"{b}: {r:6.0f}" for b, r in best.items())
            print(f"{label:22s} {row['shape']:8s} img/s by batch  {rates}   automatic ({auto}) "
                  f"{row['auto_vs_1024']:.2f}x batch 1024", flush=True)
    ratios = [r["auto_vs_1024"] for r in res["rows"]]
    print(f"automatic batch against 1024: {min(ratios):.2f}x to {max(ratios):.2f}x", flush=True)
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
