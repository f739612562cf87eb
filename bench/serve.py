"""`visrec serve` under load: 1, 8 and 32 concurrent clients for 30 s each against the default Fashion-MNIST run,
with the torch and onnx backends, and with batching off (--max-batch 1) at 32 clients; requests/s, p50/p95/p99
latency, error share, mean batch size, and the ratio to calling `Run.predict` on one image at a time in a loop in
one process (the baseline, measured in the same run). Target: with 32 clients, batching gives >= 3x the requests/s
of --max-batch 1.

The load generator is an asyncio httpx client in this process; the server is `visrec serve` in another. Both share
the machine's 2 cores, so the client's own cost is inside every number.

    python bench/serve.py [--run RUN] [--seconds 30] [--clients 1,8,32] [--out bench/serve.json]

Without --run, the default job (`visrec train fashion-mnist`) is trained first (about 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import re
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


async def load(url: str, bodies: list[bytes], clients: int, seconds: float, warmup: float = 2.0) -> dict:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
        start = time.perf_counter()
        measure_from, stop_at = start + warmup, start + warmup + seconds

        async def client(k: int) -> None:
            nonlocal errors
            i = k
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                r = await c.post("/v1/predict?top_k=5", content=bodies[i % len(bodies)],
                                 headers={"Content-Type": "image/png"})
                t1 = time.perf_counter()
                i += clients
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
                    errors += r.status_code != 200

        await asyncio.gather(*[client(k) for k in range(clients)])
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "rps": len(lat) / seconds, "errors": errors / max(1, len(lat)),
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99))}


def library_loop(run: Path, files: list[Path], seconds: float) -> float:
    """Images/s of Run.predict called on one image file at a time, in this process."""
    r = visrec.Run(run)
    r.predict([str(files[0])])  # loads the model
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        r.predict([str(files[n % len(files)])])
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="visrec-serve-bench-"))
    run = args.run
    if run is None:
        run = visrec.train("fashion-mnist", out=str(tmp / "run"), progress=False).path
    s = visrec.Run(run).summary
    print(f"run: {run} ({s.get('model')}, test accuracy {s.get('test_acc', 0):.2%})", flush=True)
    ds = visrec.runs.dataset_from_config(visrec.Run(run).config)
    files, bodies = [], []
    for i in range(256):
        buf = io.BytesIO()
        Image.fromarray(ds.test.images[i, 0].numpy()).save(buf, format="PNG")
        bodies.append(buf.getvalue())
        files.append(tmp / f"{i}.png")
        files[-1].write_bytes(buf.getvalue())
    loop_rps = library_loop(run, files, min(args.seconds, 15))
    print(f"baseline: Run.predict on one image at a time, in one process: {loop_rps:.1f} images/s", flush=True)
    clients = [int(c) for c in args.clients.split(",")]
    configs = [("torch", ["--backend", "torch"], clients), ("onnx", ["--backend", "onnx"], clients),
               ("torch, --max-batch 1", ["--backend", "torch", "--max-batch", "1"], [max(clients)])]
    rows = []
    print(f"{'server':22s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
          f"{'errors':>7s} {'batch':>6s} {'vs loop':>8s}", flush=True)
    for name, extra, levels in configs:
        srv = Server(run, *extra)
        try:
            for n in levels:
                b0 = srv.batch_stats()
                res = asyncio.run(load(srv.url, bodies, n, args.seconds))
                b1 = srv.batch_stats()
                mean_batch = (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
                row = {"server": name, "clients": n, **res, "mean_batch": mean_batch,
                       "vs_library_loop": res["rps"] / loop_rps}
                rows.append(row)
                print(f"{name:22s} {n:7d} {res['rps']:8.1f} {res['p50_ms']:8.1f} {res['p95_ms']:8.1f} "
                      f"{res['p99_ms']:8.1f} {res['errors']:7.1%} {mean_batch:6.1f} {row['vs_library_loop']:7.2f}x",
                      flush=True)
        finally:
            srv.stop()
    top = max(clients)
    batched = next(r for r in rows if r["server"] == "torch" and r["clients"] == top)
    single = next(r for r in rows if r["server"] == "torch, --max-batch 1")
    ratio = batched["rps"] / single["rps"]
    print(f"batching at {top} clients: {ratio:.2f}x the requests/s of --max-batch 1 (target >= 3x)", flush=True)
    args.out.write_text(json.dumps({"machine": machine(), "run": str(run), "test_acc": s.get("test_acc"),
                                    "library_loop_rps": loop_rps, "rows": rows, "batching_ratio": ratio},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
