"""Folders of photos at scale: time to the first training step and peak memory (VmHWM) of `visrec train
folder:PHOTOS --model resnet18 --set data.image_size=128` for 10,000 and 100,000 photo-sized JPEGs, and training
images/s against the loop people write from PyTorch's docs (torchvision ImageFolder + DataLoader(num_workers=2) +
RandomResizedCrop + RandomHorizontalFlip, the same resnet18, batch and SGD), each in a fresh process, in the same run.

The photos: `--distinct` JPEGs of 640x480 and similar sizes (smooth colour fields with texture, quality 90, about
40-60 KB, like downscaled phone photos), generated here; the 10k and 100k folders are hard links to them (each file
is opened and decoded as a separate file; only the disk space is shared).

visrec runs: `stream` is data.cache=none (worker processes decode random-resized crops from the files); `auto` is the
default (for 100k at 128 px the decoded set, 4.9 GB, is above the default memory budget, an eighth of this machine's
24 GB, so it streams too; 10k, 0.5 GB, is decoded into the cache on disk first); `disk` trains from the decoded cache
(filled beforehand, its fill time printed apart).

    python bench/streaming.py [--counts 10000 100000] [--steps 40] [--folder /tmp/visrec-stream]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baseline import machine

SIZE = 128
BATCH = 32

VISREC = """
import sys, time, json
t0 = time.perf_counter()
from visrec import Trainer
from visrec.config import resolve_config
cfg = resolve_config(None, {{"data.name": "folder:{folder}", "model.name": "resnet18", "data.image_size": {size},
                             "data.cache": "{cache}", "train.epochs": 1, "train.batch_size": {batch},
                             "train.min_epoch_steps": 0, "log.report": False, "log.every": 5}})
t = Trainer(cfg, out="{out}", quiet=True)
first = []  # seconds from the start of the process to the first batch's forward pass
orig = t._image_forward()
def forward(xb, yb, _f=orig):
    if not first:
        first.append(time.perf_counter() - t0)
    return _f(xb, yb)
t._image_forward = lambda: forward
run = t.fit(stop_after_steps={steps}, test=False)
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
windows = [r for r in run.metrics("train") if r.get("kind") == "window"][1:]  # the first window warms up
ips = sum(r["images_per_s"] for r in windows) / max(len(windows), 1) if windows else float("nan")
share = sum(r.get("data_share", 0) for r in windows) / max(len(windows), 1) if windows else float("nan")
print(json.dumps({{"first_step_s": first[0], "peak": hwm, "images_per_s": ips, "data_share": share,
                  "cache": run.summary.get("data_input", {{}}).get("cache")}}))
"""

LOOP = """
import time, json
t0 = time.perf_counter()
import torch, torchvision
from torchvision import transforms as T
ds = torchvision.datasets.ImageFolder("{folder}", T.Compose([T.RandomResizedCrop({size}), T.RandomHorizontalFlip(),
                                                             T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3)]))
dl = torch.utils.data.DataLoader(ds, batch_size={batch}, shuffle=True, num_workers=2, drop_last=True)
model = torchvision.models.resnet18(num_classes=len(ds.classes))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
first, times = None, []
for step, (x, y) in enumerate(dl):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    now = time.perf_counter()
    if first is None:
        first = now - t0
    times.append(now)
    if step + 1 >= {steps}:
        break
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
k = min(5, len(times) - 2)
print(json.dumps({{"first_step_s": first, "peak": hwm,
                  "images_per_s": (len(times) - 1 - k) * {batch} / (times[-1] - times[k])}}))
"""


def make_distinct(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.jpg"))
    if len(files) == n:
        return files
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (480, 640), (800, 600), (600, 450)]
    out = []
    for i in range(n):
        w, h = sizes[i % 4]
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (h, w, 3))
        a = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(a).filter(ImageFilter.SMOOTH).save(p, quality=90)
        out.append(p)
    return out


def make_linked(folder: Path, distinct: list[Path], n: int) -> None:
    """`n` files in two class folders, hard links to the distinct photos in turn."""
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == n:
        return
    for i in range(n):
        c = folder / ("cats" if i % 2 == 0 else "dogs")
        c.mkdir(parents=True, exist_ok=True)
        dest = c / f"{i:06d}.jpg"
        if not dest.exists():
            os.link(distinct[i % len(distinct)], dest)


def run(code: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--distinct", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--folder", default="/tmp/visrec-stream")
    args = ap.parse_args()
    root = Path(args.folder)
    print(f"machine: {machine()}")
    t0 = time.perf_counter()
    distinct = make_distinct(root / "distinct", args.distinct)
    kb = sum(p.stat().st_size for p in distinct) / len(distinct) / 1024
    print(f"{len(distinct)} distinct photos, {kb:.0f} KB each on average ({time.perf_counter() - t0:.0f} s to make)")
    rows = []
    first_n = args.counts[0]
    for n in args.counts:
        folder = root / str(n)
        make_linked(folder, distinct, n)
        cache = Path(tempfile.mkdtemp(prefix="visrec-stream-cache-"))
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}

        def visrec(mode: str, steps: int, _folder=folder, _env=env) -> dict:
            out = root / f"run-{time.time_ns()}"
            return run(VISREC.format(folder=_folder, size=SIZE, cache=mode, batch=BATCH, steps=steps, out=out), _env)

        row = {"photos": n, "stream": visrec("none", 3)}
        row["loop"] = run(LOOP.format(folder=folder, size=SIZE, batch=BATCH, steps=3))
        if n == first_n:  # training speed: on the first folder, long enough to reach the steady state
            row["stream_speed"] = visrec("none", args.steps)
            t1 = time.perf_counter()
            row["disk_fill"] = visrec("disk", 1)
            row["disk_fill"]["seconds"] = time.perf_counter() - t1
            row["disk_speed"] = visrec("disk", args.steps)
            row["loop_speed"] = run(LOOP.format(folder=folder, size=SIZE, batch=BATCH, steps=args.steps))
        rows.append(row)
        s, lp = row["stream"], row["loop"]
        print(f"{n:>7,} photos | to the first step: visrec (streaming) {s['first_step_s']:.1f} s, peak "
              f"{s['peak'] / 1e9:.2f} GB | loop {lp['first_step_s']:.1f} s, peak {lp['peak'] / 1e9:.2f} GB", flush=True)
        if "stream_speed" in row:
            ss, ds, ls = row["stream_speed"], row["disk_speed"], row["loop_speed"]
            print(f"{'':>14} | training {SIZE} px, batch {BATCH}, resnet18: loop {ls['images_per_s']:.1f} img/s; "
                  f"visrec streaming {ss['images_per_s']:.1f} img/s ({ss['images_per_s'] / ls['images_per_s']:.2f}x, "
                  f"waiting for data {ss['data_share']:.0%}); visrec from the disk cache {ds['images_per_s']:.1f} "
                  f"img/s ({ds['images_per_s'] / ls['images_per_s']:.2f}x; filling the cache took "
                  f"{row['disk_fill']['seconds']:.0f} s once)", flush=True)
        subprocess.run(["rm", "-rf", str(cache)])
    if len(rows) >= 2:
        a, b = rows[0]["stream"], rows[-1]["stream"]
        grow = (b["peak"] - a["peak"]) / 1e6
        print(f"peak memory {rows[-1]['photos']:,} vs {rows[0]['photos']:,} photos: {grow:+.0f} MB; time to the "
              f"first step {a['first_step_s']:.1f} s -> {b['first_step_s']:.1f} s")
    Path(__file__).with_suffix(".json").write_text(json.dumps({"machine": machine(), "size": SIZE, "batch": BATCH,
                                                              "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
