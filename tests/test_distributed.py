"""Training across processes: torchrun, gloo on the CPU, 2 processes, a small model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import visrec
from visrec.data import DeviceBatches
from visrec.distributed import Dist
from visrec.runs import Run

OPTS = {"data.name": "digits", "model.name": "mlp", "train.epochs": 2, "train.batch_size": 64,
        "train.min_epoch_steps": 0, "log.every": 5, "data.augment": [], "model.kwargs": {"hidden": 32, "depth": 2},
        "optim.name": "sgd", "optim.lr": 0.1, "loss.label_smoothing": 0.0, "log.report": False,
        "train.dist_timeout": 20}

DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from visrec import Trainer
    from visrec.config import resolve_config

    out, steps, resume, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume", json.loads(sys.argv[4])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.pid{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    if resume:
        t = Trainer.resume(out, progress=False)
    else:
        t = Trainer(resolve_config(None, [], options=extra), out=out, progress=False)
    t.fit(stop_after_steps=steps or None)
""")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "driver.py"
    path.write_text(DRIVER)
    return path


def launch(driver: Path, out: Path, nproc: int, steps: int = 0, resume: bool = False, opts=None,
           background: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if nproc == 1:
        cmd = [sys.executable]
    cmd += [str(driver), str(out), str(steps), "resume" if resume else "new", json.dumps(opts or OPTS)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return Run(out)


def windows(run: Run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in run.metrics("train") if r["kind"] == "window"]


@pytest.fixture(scope="module")
def one_and_two(driver, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return launch(driver, root / "one", 1), launch(driver, root / "two", 2)


def test_two_processes_follow_one_process_with_the_same_global_batch(one_and_two):
    one, two = one_and_two
    a, b = windows(one), windows(two)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 8  # every window logged once, by rank 0
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (x, y)  # float32 sums in another order: 1e-5 documented
    assert two.summary["test_acc"] == pytest.approx(one.summary["test_acc"], abs=1e-9)


def test_evaluation_counts_each_test_image_once(one_and_two):
    _, two = one_and_two
    n = two.summary["n_test"]
    assert n % 2 == 1  # digits' 359 test images: the shares are uneven
    confusion = [[int(v) for v in line.split(",")[1:]] for line in
                 (two.path / "confusion.csv").read_text().splitlines()[1:]]
    assert sum(map(sum, confusion)) == n
    assert two.evaluate().acc == pytest.approx(two.summary["test_acc"], abs=1e-9)  # one process agrees


def test_only_rank_zero_writes(one_and_two):
    one, two = one_and_two
    files = sorted(p.relative_to(two.path).as_posix() for p in two.path.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(one.path).as_posix() for p in one.path.rglob("*") if p.is_file())
    later = ("tb/", "checkpoints/", "export/")  # export/: the onnx graph a later evaluation made
    assert [f for f in files if not f.startswith(later)] == [f for f in theirs if not f.startswith(later)]
    assert len(list((two.path / "tb").glob("events.*"))) == 1
    assert sorted(p.name for p in two.path.parent.iterdir() if p.is_dir()) == ["one", "two"]


def test_checkpoints_resume_across_world_sizes(driver, one_and_two, tmp_path):
    one, _ = one_and_two
    want = windows(one)[-1][1]
    cut2 = launch(driver, tmp_path / "cut2", 2, steps=7)  # two processes stop, one resumes
    assert cut2.summary["status"] == "interrupted" and cut2.summary["steps"] == 7
    done = visrec.Trainer.resume(tmp_path / "cut2", progress=False).fit()
    assert windows(done)[-1][1] == pytest.approx(want, rel=1e-5)
    launch(driver, tmp_path / "cut1", 1, steps=9)  # one process stops, two resume
    done = launch(driver, tmp_path / "cut1", 2, resume=True)
    assert done.summary["status"] == "completed"
    assert windows(done)[-1][1] == pytest.approx(want, rel=1e-5)


def test_a_killed_rank_ends_the_others_with_an_error(driver, tmp_path):
    long = {**OPTS, "train.epochs": 400, "log.every": 1}
    out = tmp_path / "killed"
    p = launch(driver, out, 2, opts=long, background=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert (out / "metrics.jsonl").is_file(), "training never started"
        time.sleep(1.0)
        os.kill(int(Path(f"{out}.pid1").read_text()), signal.SIGKILL)
        t0 = time.time()
        output, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert time.time() - t0 < 60  # bounded: torchrun's agent and the collectives' timeout, not forever
    root = output[output.find("Root Cause"):]
    assert "rank      : 1" in root, output[-3000:]  # the launcher names the killed rank as the cause
    # rank 0 saw its gradient all-reduce fail and said where (unless the launcher's SIGTERM came first)
    assert "rank 0 of 2: lost the other processes" in output or "SIGTERM" in output, output[-3000:]


def test_device_batches_share_each_global_batch_without_overlap():
    images = torch.arange(103).view(103, 1, 1, 1)
    full = [x.flatten().tolist() for x, _ in DeviceBatches(images, torch.zeros(103), 10, seed=3).epoch(2)]
    parts = [[x.flatten().tolist() for x, _ in DeviceBatches(images, torch.zeros(103), 10, seed=3, rank=r,
                                                               world=3).epoch(2)] for r in range(3)]
    for b, whole in enumerate(full):
        assert sum((p[b] for p in parts), []) == whole  # rank order rebuilds the global batch exactly
    assert [len(p[0]) for p in parts] == [4, 3, 3]


def test_shards_cover_every_item_once():
    for n in (0, 1, 7, 359):
        for world in (1, 2, 3, 4):
            spans = [Dist(r, world).shard(n) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_a_hung_rank_times_out_the_others(driver, tmp_path):
    long = {**OPTS, "train.epochs": 400, "log.every": 1, "train.dist_timeout": 4}
    out = tmp_path / "hung"
    p = launch(driver, out, 2, opts=long, background=True)
    pid1 = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").is_file():
            time.sleep(0.2)
        assert (out / "metrics.jsonl").is_file(), "training never started"
        pid1 = int(Path(f"{out}.pid1").read_text())
        os.kill(pid1, signal.SIGSTOP)  # alive, silent: only a timeout can tell
        t0 = time.time()
        seen = ""
        while time.time() - t0 < 60:
            line = p.stdout.readline()
            seen += line
            if "DistributedError: rank 0 of 2:" in line:  # from DDP's all-reduce or one of the loop's
                break
        waited = time.time() - t0
    finally:
        if pid1:
            with contextlib.suppress(ProcessLookupError):  # the launcher may have ended it already
                os.kill(pid1, signal.SIGKILL)
        p.kill()
        p.communicate()
    assert "DistributedError: rank 0 of 2:" in seen and "at step" in seen, seen[-3000:]
    assert waited < 30  # train.dist_timeout=4 s bounds the wait, not forever


def test_max_restarts_resume_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "visrec", "train", "digits", "--model", "mlp", "--epochs", "120", "--nproc", "2",
           "--max-restarts", "1", "--out", str(out), "--no-progress", "--set", "data.augment=[]",
           "--set", "log.report=false", "--set", "model.kwargs={hidden: 16}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "last.json").is_file():
            time.sleep(0.1)
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert len(kids) == 2, kids
        os.kill(int(max(kids, key=int)), signal.SIGKILL)  # one training process dies mid-run
        output, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, output[-3000:]
    assert "restart 1 of the processes: resuming" in output
    s = Run(out).summary
    assert s["status"] == "completed" and s["steps"] == s["epochs"] * (s["steps"] // s["epochs"])
    assert s["epochs"] == 120


def test_two_processes_streaming_shards_read_each_sample_once_per_epoch(driver, tmp_path):
    """Streamed from shards, each rank reads its half of every global batch (rank 0 reads half the samples one
    process reads), and together they see the batches one process sees (a network without batch norm and no
    per-rank augmentation: the same losses)."""
    from test_streaming import _photos
    from visrec.data.shards import pack

    pack(f"folder:{_photos(tmp_path / 'photos', per_class=16)}", str(tmp_path / "shards"), "16KB")
    opts = {**OPTS, "data.name": f"wds:{tmp_path / 'shards'}", "data.image_size": 12, "data.workers": 1,
            "data.memory_budget": "1KB", "train.batch_size": 8, "log.every": 2}
    one, two = launch(driver, tmp_path / "one", 1, opts=opts), launch(driver, tmp_path / "two", 2, opts=opts)
    assert one.summary["data_input"]["cache"] == two.summary["data_input"]["cache"] == "none"
    read = one.summary["steps"] * one.summary["batch_size"]
    assert one.summary["data_input"]["read_by_rank0"] == read
    assert two.summary["data_input"]["read_by_rank0"] == read // 2
    a, b = windows(one), windows(two)
    assert [s for s, _ in a] == [s for s, _ in b] and len(a) >= 4
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (x, y)

    # read in sequence, each rank its own shards: rank 0 reads its half of every global batch, none twice
    seq = {**opts, "data.shard_read": "sequential", "data.shuffle_buffer": 4}
    two = launch(driver, tmp_path / "seq", 2, opts=seq)
    s = two.summary
    assert s["status"] == "completed" and s["data_input"]["read_by_rank0"] == s["steps"] * s["batch_size"] // 2
