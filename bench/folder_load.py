"""A folder of photos, read as a user brings one: time to the first training step and peak memory (VmHWM) of
`visrec train folder:PHOTOS --model resnet18 --set data.image_size=S`, against the loop people write from
torchvision's docs (ImageFolder + DataLoader(num_workers=2) + RandomResizedCrop(S)), each in a fresh process, in
the same run. The photos are generated here: JPEGs of 640x480 and similar sizes, quality 90 (~150 KB each), two
classes.

visrec reads a folder at one size before the first step (the fast path for data that fits): the first run decodes
it into the decoded cache (`data.cache`, a memory-mapped file in the user cache, here a fresh one), a second run
reads it from there. This bench measures both, so the streaming path can be judged against them.

    python bench/folder_load.py [--photos 2000 8000] [--sizes 128 224] [--folder /tmp/visrec-photos]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baseline import machine

VISREC = """
import sys, time
t0 = time.perf_counter()
from visrec import Trainer
from visrec.config import resolve_config
cfg = resolve_config(None, {{"data.name": "folder:{folder}", "model.name": "resnet18", "data.image_size": {size},
                             "train.epochs": 1, "train.batch_size": 32, "log.report": False}})
Trainer(cfg, out="{out}", quiet=True).fit(stop_after_steps=1, test=False)
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(time.perf_counter() - t0, hwm)
"""

LOOP = """
import time
t0 = time.perf_counter()
import torch, torchvision
from torchvision import transforms as T
ds = torchvision.datasets.ImageFolder("{folder}", T.Compose([T.RandomResizedCrop({size}), T.RandomHorizontalFlip(),
                                                             T.ToTensor()]))
dl = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=2)
model = torchvision.models.resnet18(num_classes=2)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
x, y = next(iter(dl))
torch.nn.functional.cross_entropy(model(x), y).backward()
opt.step()
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(time.perf_counter() - t0, hwm)
"""


def make_photos(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    have = sum(1 for _ in folder.rglob("*.jpg")) if folder.is_dir() else 0
    if have == n:
        return
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    sizes = [(640, 480), (480, 640), (800, 600), (600, 450)]
    for c in ("cats", "dogs"):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            w, h = sizes[i % 4]
            a = np.roll(base, i * 7 + (c == "dogs") * 3, axis=1)[:h, :w]
            Image.fromarray(a).save(folder / c / f"{i:06d}.jpg", quality=90)


def run(code: str, env: dict | None = None) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    seconds, hwm = out.stdout.split()[-2:]
    return float(seconds), int(hwm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    ap.add_argument("--folder", default="/tmp/visrec-photos")
    args = ap.parse_args()
    rows = []
    print(f"machine: {machine()}")
    print(f"{'photos':>7} {'size':>5} | {'visrec: 1st run':>16} {'peak':>8} | {'2nd run':>8} {'peak':>8} | "
          f"{'loop':>7} {'peak':>8} | 1st/loop 2nd/loop")
    for n in args.photos:
        folder = Path(args.folder) / str(n)
        make_photos(folder, n)
        for size in args.sizes:
            cache = Path(tempfile.mkdtemp(prefix="visrec-bench-cache-"))
            env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
            v = run(VISREC.format(folder=folder, size=size, out=Path(args.folder) / f"run-{time.time_ns()}"), env)
            c = run(VISREC.format(folder=folder, size=size, out=Path(args.folder) / f"run-{time.time_ns()}"), env)
            shutil.rmtree(cache)
            b = run(LOOP.format(folder=folder, size=size))
            rows.append({"photos": n, "size": size, "visrec_seconds": round(v[0], 2), "visrec_peak_bytes": v[1],
                         "visrec_cached_seconds": round(c[0], 2), "visrec_cached_peak_bytes": c[1],
                         "loop_seconds": round(b[0], 2), "loop_peak_bytes": b[1]})
            print(f"{n:>7} {size:>5} | {v[0]:>14.1f} s {v[1] / 1e9:>6.2f} GB | {c[0]:>6.1f} s {c[1] / 1e9:>6.2f} GB | "
                  f"{b[0]:>5.1f} s {b[1] / 1e9:>6.2f} GB | {v[0] / b[0]:>7.1f}x {c[0] / b[0]:>7.1f}x", flush=True)
    Path(__file__).with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
