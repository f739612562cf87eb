"""The default job against a plain PyTorch loop, on the same machine in the same run.

visrec: `visrec train fashion-mnist` (the default recipe) for several seeds: test accuracy and
training time (evaluation excluded). Baseline: the loop users write by hand from PyTorch's MNIST
example (DataLoader over tensors, batch 64, the 2-conv network with dropout, Adadelta lr 1.0 with
StepLR 0.7), 3 epochs, test accuracy after each epoch with evaluation outside the timed region.

    python bench/default_job.py [--seeds 0,1,2] [--baseline-epochs 3] [--out bench/default_job.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import visrec


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout1(x).flatten(1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def plain_loop(epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    ds = visrec.load_dataset("fashion-mnist", val_fraction=0)
    to_float = lambda x: ((x.float() / 255) - 0.1307) / 0.3081  # noqa: E731 - the example's constants
    train = DataLoader(TensorDataset(to_float(ds.train.images), ds.train.labels), batch_size=64, shuffle=True)
    xte, yte = to_float(ds.test.images), ds.test.labels
    model = PlainNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    curve, seconds = [], 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for x, y in train:
            opt.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            acc = sum((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item() for i in range(0, 10000, 1000))
        curve.append({"epoch": epoch, "train_seconds": round(seconds, 2), "test_acc": acc / 10000})
        print(f"  plain loop epoch {epoch}: {seconds:7.1f} s  test {acc / 100:.2f}%", flush=True)
    return {"train_seconds": seconds, "test_acc": curve[-1]["test_acc"], "curve": curve}


def visrec_default(seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = visrec.train("fashion-mnist", seed=seed, out=Path(tmp) / "run", progress=False)
        wall = time.perf_counter() - t0
        s = run.summary
    print(f"  visrec default seed {seed}: {s['train_seconds']:7.1f} s  test {s['test_acc']:.2%}  "
          f"({s['images_per_s']:.0f} img/s, {wall:.0f} s wall)", flush=True)
    return {"seed": seed, "train_seconds": s["train_seconds"], "test_acc": s["test_acc"], "wall_seconds": wall,
            "images_per_s": s["images_per_s"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--baseline-epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "visrec": visrec.__version__}
    print(f"machine: {machine}", flush=True)
    print("baseline (plain PyTorch loop):", flush=True)
    base = plain_loop(args.baseline_epochs)
    print("visrec default job:", flush=True)
    runs = [visrec_default(s) for s in seeds]
    accs = [r["test_acc"] for r in runs]
    secs = [r["train_seconds"] for r in runs]
    result = {
        "machine": machine,
        "baseline": base,
        "visrec": {"runs": runs, "test_acc_mean": statistics.mean(accs),
                   "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   "train_seconds_mean": statistics.mean(secs),
                   "train_seconds_std": statistics.stdev(secs) if len(secs) > 1 else 0.0},
    }
    result["ratio_train_seconds"] = result["visrec"]["train_seconds_mean"] / base["train_seconds"]
    v = result["visrec"]
    print(f"\nvisrec default: {v['test_acc_mean']:.2%} +- {v['test_acc_std']:.2%} test accuracy in "
          f"{v['train_seconds_mean']:.1f} +- {v['train_seconds_std']:.1f} s ({len(seeds)} seeds)")
    print(f"plain loop:     {base['test_acc']:.2%} test accuracy in {base['train_seconds']:.1f} s "
          f"({args.baseline_epochs} epochs)")
    print(f"ratio: visrec's training time is {result['ratio_train_seconds']:.2f}x the plain loop's; its test "
          f"accuracy is {(v['test_acc_mean'] - base['test_acc']) * 100:+.2f} points against the loop's")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
