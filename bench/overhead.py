"""The Trainer's per-step overhead against a bare loop on the same model, batches and optimizer.

Both train the default convnet on Fashion-MNIST for one epoch (no augmentation, so both do the same work per
step): the bare loop is what a user writes (normalize, forward, loss, backward, step), over visrec's own
device-resident batches; the Trainer runs the default config with its metrics, windows, TensorBoard and
histograms, evaluation excluded as in every visrec timing. The two alternate, `--reps` times each; the result
is the median of the per-rep ratios of seconds per step (and, less disturbed by a busy machine, the fastest
Trainer epoch against the fastest bare one).

    python bench/overhead.py [--reps 5] [--device cpu] [--out bench/overhead.json]

On CUDA both use bf16 autocast (the Trainer's default there), so the comparison is per step at equal work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import visrec
from baseline import machine
from visrec.config import resolve_config
from visrec.data import DeviceBatches, Normalizer
from visrec.device import autocast, resolve_device, resolve_precision, sync
from visrec.models import create_model

SETTINGS = ["data.augment=[]", "eval.tta=none", "log.report=false"]


def bare_loop(ds, cfg, seed: int) -> tuple[float, int]:
    torch.manual_seed(seed)
    device = resolve_device(cfg.device.name)
    amp = resolve_precision(cfg.device.precision, device)
    norm = Normalizer.fit(ds.train.images, cfg.data.normalize).to(device)
    model = create_model(cfg.model.name, in_chans=ds.channels, num_classes=ds.num_classes,
                         image_size=ds.image_size).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr * 0.1, momentum=cfg.optim.momentum, nesterov=True,
                          weight_decay=cfg.optim.weight_decay)
    batches = DeviceBatches(ds.train.images.to(device), ds.train.labels.to(device), cfg.train.batch_size, seed=seed)
    model.train()
    steps = 0
    sync(device)
    t0 = time.perf_counter()
    for xb, yb in (b for e in range(cfg.train.epochs) for b in batches.epoch(e)):
        x = norm(xb).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            out = model(x)
        loss = F.cross_entropy(out, yb, label_smoothing=cfg.loss.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    sync(device)
    return time.perf_counter() - t0, steps


def trainer(cfg, seed: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        run = visrec.Trainer(cfg, out=Path(tmp) / "run", progress=False).fit(test=False)
        s = run.summary
    return s["train_seconds"], s["steps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    ap.add_argument("--epochs", type=int, default=1, help="per rep (more on a fast device)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    cfg = resolve_config(None, [*SETTINGS, f"train.epochs={args.epochs}", f"device.name={args.device}"])
    ds = visrec.load_dataset("fashion-mnist", val_fraction=cfg.data.val_fraction)
    times: dict[str, list[float]] = {"bare": [], "trainer": []}
    for rep in range(args.reps):
        order = ("bare", "trainer") if rep % 2 == 0 else ("trainer", "bare")
        for name in order:
            secs, steps = bare_loop(ds, cfg, rep) if name == "bare" else trainer(cfg, rep)
            times[name].append(secs / steps)
            print(f"  rep {rep + 1} {name:8s} {secs:6.1f} s for {steps} steps = {secs / steps * 1000:6.1f} ms/step",
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [t / b - 1 for t, b in zip(times["trainer"], times["bare"], strict=True)]  # same rep, back to back
    overhead = statistics.median(paired)
    best = min(times["trainer"]) / min(times["bare"]) - 1  # the fastest of each: least disturbed by the machine
    result = {"machine": machine(), "steps_per_rep": steps, "ms_per_step": {k: [round(x * 1000, 3) for x in v]
                                                                           for k, v in times.items()},
              "median_ms_per_step": {k: round(v * 1000, 3) for k, v in med.items()}, "overhead": overhead,
              "overhead_per_rep": paired, "overhead_fastest": best,
              "settings": SETTINGS, "device": args.device}
    print(f"\nmedian per step: bare loop {med['bare'] * 1000:.1f} ms, Trainer {med['trainer'] * 1000:.1f} ms")
    print(f"Trainer overhead: median of the per-rep ratios {overhead:+.1%} (reps: "
          f"{', '.join(f'{p:+.1%}' for p in paired)}); fastest against fastest {best:+.1%} (target <= 3%)")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
