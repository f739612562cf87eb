"""Depthwise-separable convolutions on the CPU: their real training speed, not their multiply-accumulates.

A 3x3 convolution from cin to cout channels costs 9*cin*cout multiply-accumulates per pixel; its depthwise-separable
replacement (MobileNet's block: a 3x3 depthwise convolution, batch norm, ReLU, then a 1x1 pointwise convolution)
costs 9*cin + cin*cout, 4-8x fewer at the widths of visrec's Fashion-MNIST networks. Whether the steps get faster
depends on the kernels: depthwise convolutions do little arithmetic per byte moved.

For each network this builds it as the zoo gives it and a twin whose every 3x3 convolution with at least
`--min-channels` input channels is made depthwise-separable (the stem, which reads the image, is kept), then times
training steps (forward, backward, a Nesterov SGD step; channels_last, batch `--batch`) of both, alternating
A/B/A/B so the machine's drift hits both alike, best of the rounds.

    python bench/separable.py [--models preset:fmnist-fast,resnet20] [--batch 256] [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from baseline import machine
from visrec.config import OptimConfig, resolve_config
from visrec.models import create_model
from visrec.models.summary import summary
from visrec.training.optim import build_optimizer


def separable(conv: nn.Conv2d) -> nn.Sequential:
    """MobileNet's replacement for `conv`: depthwise kxk (same stride and padding), BN, ReLU, pointwise 1x1."""
    cin, cout = conv.in_channels, conv.out_channels
    return nn.Sequential(
        nn.Conv2d(cin, cin, conv.kernel_size, stride=conv.stride, padding=conv.padding, groups=cin, bias=False),
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=conv.bias is not None))


def make_separable(module: nn.Module, min_channels: int) -> int:
    """Replace, in place, every 3x3 ungrouped convolution with >= min_channels inputs; returns how many."""
    count = 0
    for name, child in module.named_children():
        if (isinstance(child, nn.Conv2d) and child.kernel_size == (3, 3) and child.groups == 1
                and child.in_channels >= min_channels):
            setattr(module, name, separable(child))
            count += 1
        else:
            count += make_separable(child, min_channels)
    return count


def build(entry: str) -> tuple[str, nn.Module]:
    kwargs = {}
    name = entry
    if entry.startswith("preset:"):
        cfg = resolve_config(entry.split(":", 1)[1])
        name, kwargs = cfg.model.name, cfg.model.kwargs
    return name, create_model(name, in_chans=1, num_classes=10, image_size=(28, 28), **kwargs)


def stepper(model: nn.Module, batch: int):
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = build_optimizer(model, OptimConfig(name="nesterov", lr=0.01, weight_decay=5e-4))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    return step


def images_per_s(step, batch: int, seconds: float) -> float:
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        count += 1
    return batch * count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="preset:fmnist-fast,resnet20")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--min-channels", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    print(f"training steps, batch {args.batch}, channels_last, best of {args.rounds} alternating rounds of "
          f"{args.seconds:g} s", flush=True)
    print(f"{'model':22s} {'convs':>5s} {'MMAC/img':>8s} {'sep MMAC':>8s} {'MAC ratio':>9s} "
          f"{'img/s':>7s} {'sep img/s':>9s} {'speed ratio':>11s}")
    rows = []
    for entry in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(0)
        name, dense = build(entry)
        _, sep = build(entry)
        replaced = make_separable(sep, args.min_channels)
        macs = summary(dense.eval(), (1, 28, 28)).macs
        sep_macs = summary(sep.eval(), (1, 28, 28)).macs
        steps = {"dense": stepper(dense, args.batch), "separable": stepper(sep, args.batch)}
        best = {k: 0.0 for k in steps}
        for _ in range(args.rounds):
            for k, step in steps.items():
                best[k] = max(best[k], images_per_s(step, args.batch, args.seconds))
        row = {"entry": entry, "model": name, "convs_replaced": replaced, "macs": macs, "separable_macs": sep_macs,
               "train_images_per_s": best["dense"], "separable_train_images_per_s": best["separable"],
               "mac_ratio": macs / sep_macs, "speed_ratio": best["separable"] / best["dense"]}
        rows.append(row)
        print(f"{entry:22s} {replaced:5d} {macs / 1e6:8.2f} {sep_macs / 1e6:8.2f} {row['mac_ratio']:8.2f}x "
              f"{best['dense']:7.0f} {best['separable']:9.0f} {row['speed_ratio']:10.2f}x", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "batch": args.batch, "rounds": args.rounds,
                                    "seconds": args.seconds, "models": rows}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
