"""Shared by the bench scripts: the plain PyTorch loop users write by hand (the baseline) and the machine's facts.

The loop follows PyTorch's MNIST example: DataLoader over tensors, batch 64, the 2-conv network with dropout,
Adadelta lr 1.0 with StepLR 0.7, test accuracy after each epoch with evaluation outside the timed region.
"""

from __future__ import annotations

import platform
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


def plain_loop(epochs: int, seed: int = 0, evals_per_epoch: int = 1) -> dict:
    """The loop, with test accuracy `evals_per_epoch` times an epoch (evaluation outside the timed region);
    `epoch_seconds` is the mean training time of one epoch."""
    torch.manual_seed(seed)
    ds = visrec.load_dataset("fashion-mnist", val_fraction=0)
    to_float = lambda x: ((x.float() / 255) - 0.1307) / 0.3081  # noqa: E731 - the example's constants
    train = DataLoader(TensorDataset(to_float(ds.train.images), ds.train.labels), batch_size=64, shuffle=True)
    xte, yte = to_float(ds.test.images), ds.test.labels
    model = PlainNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    n = len(train)
    marks = {round(n * k / evals_per_epoch) for k in range(1, evals_per_epoch + 1)}
    curve, seconds = [], 0.0

    def test(epoch: float) -> None:
        model.eval()
        with torch.no_grad():
            acc = sum((model(xte[i:i + 1000]).argmax(1) == yte[i:i + 1000]).sum().item() for i in range(0, 10000, 1000))
        model.train()
        curve.append({"epoch": round(epoch, 3), "train_seconds": round(seconds, 2), "test_acc": acc / 10000})
        if float(epoch).is_integer():
            print(f"  plain loop epoch {epoch:g}: {seconds:7.1f} s  test {acc / 100:.2f}%", flush=True)

    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(train, 1):
            opt.zero_grad()
            F.nll_loss(model(x), y).backward()
            opt.step()
            if i in marks:
                seconds += time.perf_counter() - t0
                test(epoch - 1 + i / n)
                t0 = time.perf_counter()
        sched.step()
        seconds += time.perf_counter() - t0
    return {"train_seconds": seconds, "test_acc": curve[-1]["test_acc"], "curve": curve,
            "epoch_seconds": seconds / epochs}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "visrec": visrec.__version__}


def first_reaching(curve: list[dict], acc: float) -> float | None:
    """train_seconds at the first point of `curve` whose test_acc reaches `acc`, else None."""
    return next((p["train_seconds"] for p in curve if p["test_acc"] >= acc), None)


def interpolated_crossing(curve: list[dict], acc: float) -> float | None:
    """The training time at which `curve` first crosses `acc`, linearly interpolated between the last point below
    it and the first point at or above it (the first point's time when it starts above); None if never."""
    prev = None
    for p in curve:
        if p["test_acc"] >= acc:
            if prev is None:
                return p["train_seconds"]
            f = (acc - prev["test_acc"]) / (p["test_acc"] - prev["test_acc"])
            return prev["train_seconds"] + f * (p["train_seconds"] - prev["train_seconds"])
        prev = p
    return None
