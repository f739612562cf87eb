"""`visrec serve` under load: 1, 8 and 32 concurrent clients for 30 s each against the default Fashion-MNIST run,
with the torch and onnx backends, and with batching off (--max-batch 1) at 32 clients; requests/s, p50/p95/p99
latency, error share, mean batch size, and the ratio to calling `Run.predict` on one image at a time in a loop in
one process (the baseline, measured in the same run). Target: with 32 clients, batching gives >= 3x the requests/s
of --max-batch 1.

The load generator is autocannon (Node; installed by npm into ~/.cache/visrec/bench-node on first use), driven by
bench/serve_load.js: an async Python client (httpx) spent a whole core on its own side and capped the server at
about 300 requests/s. Client and server still share the machine's 2 cores, so the client's cost is inside every
number.

    python bench/serve.py [--run RUN] [--seconds 30] [--clients 1,8,32] [--out bench/serve.json]

Without --run, the default job (`visrec train fashion-mnist`) is trained first (about 2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import visrec
from baseline import machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, run: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "visrec", "serve", str(run), "--port", str(self.port),
                                      *args], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not get ready")
            time.sleep(0.3)

    def batch_stats(self) -> tuple[float, float]:
        text = httpx.get(self.url + "/metrics").text
        total = sum(float(v) for v in re.findall(r"^visrec_batch_size_sum\{[^}]*\} (\S+)", text, re.M))
        count = sum(float(v) for v in re.findall(r"^visrec_batch_size_count\{[^}]*\} (\S+)", text, re.M))
        return total, count

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


NODE_CACHE = Path.home() / ".cache" / "visrec" / "bench-node"


def autocannon() -> Path:
    """The node_modules folder holding autocannon, installed on first use."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("bench/serve.py needs Node.js and npm for its load generator (Debian: apt-get install nodejs "
                         "npm)")
    modules = NODE_CACHE / "node_modules"
    if not (modules / "autocannon").is_dir():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(NODE_CACHE), "--no-audit", "--no-fund", "autocannon@9"],
                       check=True, stdout=subprocess.DEVNULL)
    return modules


def load(url: str, files: list[Path], clients: int, seconds: float, modules: Path, warmup: float = 2.0) -> dict:
    script = str(Path(__file__).with_name("serve_load.js"))
    env = {**os.environ, "NODE_PATH": str(modules)}
    subprocess.run(["node", script, url, str(clients), str(warmup), *map(str, files[:8])], env=env, check=True,
                   capture_output=True)
    out = subprocess.run(["node", script, url, str(clients), str(seconds), *map(str, files)], env=env, check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    failed = r["errors"] + r["bad_status"]
    return {"requests": r["requests"], "rps": r["requests"] / r["seconds"], "errors": failed / max(1, r["requests"]),
            "p50_ms": r["p50_ms"], "p95_ms": r["p95_ms"], "p99_ms": r["p99_ms"]}


def library_loop(run: Path, files: list[Path], seconds: float) -> float:
    """Images/s of Run.predict called on one image file at a time, in this process."""
    r = visrec.Run(run)
    r.predict([str(files[0])])  # loads the model
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        r.predict([str(files[n % len(files)])])
        n += 1
    return n / (time.perf_counter() - t0)


def forward_alone(run: Path) -> dict[int, float]:
    """Milliseconds per image of the served model's own batch (decoded inputs, TTA as served), by batch size: how much
    batching can gain at most when nothing but the model costs anything."""
    from visrec.serve.model import ServedModel

    m = ServedModel(run).load()
    item = m.prepare(_png(m), "probe")
    out = {}
    for n in (1, 8, 32):
        items = [item] * n
        m.infer(items, 5)
        reps = max(5, 200 // n)
        t0 = time.perf_counter()
        for _ in range(reps):
            m.infer(items, 5)
        out[n] = (time.perf_counter() - t0) / reps / n * 1000
    return out


def _png(m) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((m.size[0], m.size[1]), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    modules = autocannon()
    tmp = Path(tempfile.mkdtemp(prefix="visrec-serve-bench-"))
    run = args.run
    if run is None:
        run = visrec.train("fashion-mnist", out=str(tmp / "run"), progress=False).path
    s = visrec.Run(run).summary
    print(f"run: {run} ({s.get('model')}, test accuracy {s.get('test_acc', 0):.2%})", flush=True)
    ds = visrec.runs.dataset_from_config(visrec.Run(run).config)
    files = []
    for i in range(256):
        files.append(tmp / f"{i}.png")
        Image.fromarray(ds.test.images[i, 0].numpy()).save(files[-1])
    loop_rps = library_loop(run, files, min(args.seconds, 15))
    print(f"baseline: Run.predict on one image at a time, in one process: {loop_rps:.1f} images/s", flush=True)
    alone = forward_alone(run)
    print("the model alone (in-process, no HTTP): " + ", ".join(f"batch {n}: {ms:.3f} ms per image" for n, ms in
                                                               alone.items())
          + f"; batch 32 is {alone[1] / alone[32]:.2f}x cheaper per image than batch 1", flush=True)
    clients = [int(c) for c in args.clients.split(",")]
    top = max(clients)
    configs = [("torch", ["--backend", "torch"], clients), ("onnx", ["--backend", "onnx"], clients),
               ("torch, --max-batch 1", ["--backend", "torch", "--max-batch", "1"], [top])]
    servers = {name: Server(run, *extra) for name, extra, _ in configs}  # idle servers cost no CPU
    rows = []
    try:
        print(f"{'server':22s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
              f"{'errors':>7s} {'batch':>6s} {'vs loop':>8s}", flush=True)
        for name, _, levels in configs:
            for n in levels:
                row = measure(servers[name], name, files, n, args.seconds, modules, loop_rps)
                rows.append(row)
                print(f"{name:22s} {n:7d} {row['rps']:8.1f} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} "
                      f"{row['p99_ms']:8.1f} {row['errors']:7.1%} {row['mean_batch']:6.1f} "
                      f"{row['vs_library_loop']:7.2f}x", flush=True)
        # this machine's speed drifts by tens of percent within minutes: the batching ratio alternates short windows
        # between the two live servers and compares their sums
        pairs = []
        for _ in range(3):
            a = measure(servers["torch"], "torch", files, top, args.seconds / 2, modules, loop_rps)
            b = measure(servers["torch, --max-batch 1"], "torch, --max-batch 1", files, top, args.seconds / 2,
                        modules, loop_rps)
            pairs.append((a["rps"], b["rps"]))
            print(f"  alternating at {top} clients: batched {a['rps']:.1f} req/s (mean batch {a['mean_batch']:.1f}), "
                  f"--max-batch 1 {b['rps']:.1f} req/s: {a['rps'] / b['rps']:.2f}x", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    ratio = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
    print(f"batching at {top} clients: {ratio:.2f}x the requests/s of --max-batch 1 over the alternating windows "
          "(target >= 3x)", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "run": str(run), "test_acc": s.get("test_acc"),
                                    "library_loop_rps": loop_rps, "model_alone_ms_per_image": alone,
                                    "rows": rows, "alternating": pairs,
                                    "batching_ratio": ratio}, indent=2) + "\n")


def measure(srv: Server, name: str, files: list[Path], clients: int, seconds: float, modules: Path,
            loop_rps: float) -> dict:
    b0 = srv.batch_stats()
    res = load(srv.url + "/v1/predict?top_k=5", files, clients, seconds, modules)
    b1 = srv.batch_stats()
    return {"server": name, "clients": clients, **res, "mean_batch": (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1]),
            "vs_library_loop": res["rps"] / loop_rps}


if __name__ == "__main__":
    main()
