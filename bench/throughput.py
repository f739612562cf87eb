"""Training and inference throughput of visrec's models on Fashion-MNIST-sized inputs, as images/s and as
achieved GFLOP/s against the machine's measured fp32 matmul peak (measured in the same run).

FLOPs per image: 2 x the multiply-accumulates that `visrec.models.summary` counts; a training step costs about
3x a forward pass (forward, input gradients, weight gradients).

    python bench/throughput.py [--models mlp,lenet5,convnet,preset:fmnist-fast,resnet20] [--batch 256]

An entry `preset:NAME` measures that preset's model with its keyword arguments; `ENTRY@24` feeds it 24x24 inputs
(what train.progressive_size costs); `ENTRY+muon` trains it with the Muon optimizer instead of Nesterov SGD (what
orthogonalizing the conv kernels' updates costs); `ENTRY+compile` trains it through `torch.compile` (what
`model.compile=true` gives a training step once compiled; its inference columns stay eager). Inference is measured
in torch (eager, channels_last for conv nets) and through onnxruntime (visrec's default CPU backend for predict and
eval).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from baseline import machine
from visrec.config import OptimConfig, resolve_config
from visrec.inference import onnx_network
from visrec.models import create_model
from visrec.models.summary import summary
from visrec.training.optim import build_optimizer


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def measure(entry: str, batch: int, seconds: float) -> dict:
    torch.manual_seed(0)
    kwargs = {}
    name, muon = entry.removesuffix("+muon"), entry.endswith("+muon")
    name, compiled = name.removesuffix("+compile"), name.endswith("+compile")
    name, _, size = name.partition("@")
    size = int(size or 28)
    if name.startswith("preset:"):
        cfg = resolve_config(name.split(":", 1)[1])
        name, kwargs = cfg.model.name, cfg.model.kwargs
    model = create_model(name, in_chans=1, num_classes=10, image_size=(28, 28), **kwargs)
    macs = summary(model.eval(), (1, size, size)).macs
    cl = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    opt = build_optimizer(model, OptimConfig(name="muon" if muon else "nesterov", lr=0.01, weight_decay=5e-4))

    def timed(step) -> float:
        for _ in range(3):
            step()
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            count += 1
        return batch * count / (time.perf_counter() - t0)

    forward = torch.compile(model) if compiled else model

    def train_step():
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t0 = time.perf_counter()
    train_step()  # with +compile, this first step compiles
    first_step = time.perf_counter() - t0
    train_ips = timed(train_step)
    model.eval()
    with torch.inference_mode():
        infer_ips = timed(lambda: model(x))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "weights"
        src.write_bytes(b"")
        net = onnx_network(copy.deepcopy(model), x[:4].contiguous(), Path(tmp) / "net.onnx", source=src)
        xc = x.contiguous()
        onnx_ips = timed(lambda: net(xc))
    return {"model": name, "kwargs": kwargs, "size": size, "optimizer": "muon" if muon else "nesterov", "macs": macs,
            "compiled": compiled, "first_step_seconds": first_step,
            "train_images_per_s": train_ips, "infer_images_per_s": infer_ips, "onnx_images_per_s": onnx_ips,
            "train_gflops": train_ips * macs * 2 * 3 / 1e9, "infer_gflops": infer_ips * macs * 2 / 1e9,
            "onnx_gflops": onnx_ips * macs * 2 / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,lenet5,convnet,preset:fmnist-fast,preset:fmnist-fast@24,"
                                        "preset:fmnist-fast@20,preset:fmnist-fast+muon,resnet20")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048x2048): {peak:.0f} GFLOP/s", flush=True)
    rows = []
    print(f"{'model':25s} {'MFLOP/img':>9s} {'train img/s':>11s} {'GFLOP/s':>8s} {'of peak':>7s} "
          f"{'infer img/s':>11s} {'GFLOP/s':>8s} {'of peak':>7s} {'onnxruntime':>11s} {'vs torch':>8s}")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = measure(name, args.batch, args.seconds)
        r["entry"] = name
        r["train_of_peak"], r["infer_of_peak"] = r["train_gflops"] / peak, r["infer_gflops"] / peak
        rows.append(r)
        print(f"{name:25s} {2 * r['macs'] / 1e6:9.1f} {r['train_images_per_s']:11.0f} {r['train_gflops']:8.1f} "
              f"{r['train_of_peak']:7.0%} {r['infer_images_per_s']:11.0f} {r['infer_gflops']:8.1f} "
              f"{r['infer_of_peak']:7.0%} {r['onnx_images_per_s']:11.0f} "
              f"{r['onnx_images_per_s'] / r['infer_images_per_s']:7.2f}x"
              + (f"  (training compiled: first step {r['first_step_seconds']:.1f} s)" if r["compiled"] else ""),
              flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "batch": args.batch, "matmul_peak_gflops": peak,
                                    "models": rows}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
