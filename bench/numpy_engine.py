"""visrec.ref, the NumPy engine, measured: fast convolution and pooling against the naive loops and against torch's
CPU convolution, and the course's FullyConnectedNet trained on Fashion-MNIST in both engines with one config.

    python bench/numpy_engine.py [--out bench/numpy_engine.json]

Targets: fast conv and pool (forward + backward) at least 50x faster than the naive ones on a (50, 3, 32, 32)
batch with 16 or 64 filters of 3x3; the ratio to torch reported as measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

import visrec
from baseline import machine
from visrec import ref


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def conv_rows(filters: int) -> dict:
    r = np.random.default_rng(0)
    x = r.standard_normal((50, 3, 32, 32)).astype(np.float32)
    w = (r.standard_normal((filters, 3, 3, 3)) * 0.1).astype(np.float32)
    b = np.zeros(filters, np.float32)
    p = {"stride": 1, "pad": 1}
    out_n, cache_n = ref.conv_forward_naive(x, w, b, p)
    dout = r.standard_normal(out_n.shape).astype(np.float32)
    t_nf = best_of(lambda: ref.conv_forward_naive(x, w, b, p), 1)
    t_nb = best_of(lambda: ref.conv_backward_naive(dout, cache_n), 1)
    out_f, cache_f = ref.conv_forward_fast(x, w, b, p)
    t_ff = best_of(lambda: ref.conv_forward_fast(x, w, b, p), 5)
    t_fb = best_of(lambda: ref.conv_backward_fast(dout, cache_f), 5)
    same = float(np.abs(out_f - out_n).max())
    xt, wt, bt = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
    dt = torch.from_numpy(dout)

    def torch_pass():
        for a in (xt, wt, bt):
            a.grad = None
        F.conv2d(xt, wt, bt, padding=1).backward(dt)

    torch_pass()
    t_torch = best_of(torch_pass, 5)
    pool = {"pool_height": 2, "pool_width": 2, "stride": 2}
    a = np.maximum(out_f, 0)
    pout, pc_n = ref.max_pool_forward_naive(a, pool)
    pd = r.standard_normal(pout.shape).astype(np.float32)
    t_pn = best_of(lambda: ref.max_pool_backward_naive(pd, ref.max_pool_forward_naive(a, pool)[1]), 1)
    t_pf = best_of(lambda: ref.max_pool_backward_fast(pd, ref.max_pool_forward_fast(a, pool)[1]), 5)
    return {"filters": filters, "conv_naive_s": t_nf + t_nb, "conv_fast_s": t_ff + t_fb,
            "conv_speedup": (t_nf + t_nb) / (t_ff + t_fb), "conv_torch_s": t_torch,
            "fast_vs_torch": (t_ff + t_fb) / t_torch, "max_abs_diff": same,
            "pool_naive_s": t_pn, "pool_fast_s": t_pf, "pool_speedup": t_pn / t_pf}


def engines(tmp: Path, epochs: int) -> dict:
    out = {}
    for engine in ("numpy", "torch"):
        run = visrec.train("fashion-mnist", model="fc_net", epochs=epochs, out=str(tmp / engine), progress=False,
                           overrides={"train.engine": engine, "log.report": False, "eval.tta": "none",
                                      "data.augment": [], "optim.name": "adam", "optim.lr": 3e-3,
                                      "model.kwargs": {"hidden_dims": [100, 100], "normalization": "batchnorm"}})
        s = run.summary
        out[engine] = {"test_acc": s["test_acc"], "train_seconds": s["train_seconds"],
                       "seconds_per_epoch": s["train_seconds"] / epochs, "images_per_s": s["images_per_s"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}", flush=True)
    rows = [conv_rows(f) for f in (16, 64)]
    for r in rows:
        ok = "meets" if min(r["conv_speedup"], r["pool_speedup"]) >= 50 else "MISSES"
        print(f"(50, 3, 32, 32), {r['filters']} filters 3x3, stride 1, pad 1, forward + backward:\n"
              f"  conv: naive {r['conv_naive_s']:.2f} s, fast {1e3 * r['conv_fast_s']:.1f} ms -> "
              f"{r['conv_speedup']:.0f}x; torch {1e3 * r['conv_torch_s']:.1f} ms (fast NumPy takes "
              f"{r['fast_vs_torch']:.1f}x torch's time); outputs differ by {r['max_abs_diff']:.1e}\n"
              f"  2x2 max pool: naive {r['pool_naive_s']:.2f} s, fast {1e3 * r['pool_fast_s']:.1f} ms -> "
              f"{r['pool_speedup']:.0f}x   [{ok} the 50x target]", flush=True)
    with tempfile.TemporaryDirectory() as t:
        e = engines(Path(t), args.epochs)
    print(f"fc_net (hidden 100-100, batch norm, Adam 3e-3, batch 256, {args.epochs} epochs) on Fashion-MNIST, "
          "one config, two engines:")
    for name, r in e.items():
        print(f"  {name:5s}  test accuracy {r['test_acc']:.2%}  {r['seconds_per_epoch']:.2f} s/epoch "
              f"({r['images_per_s']:,.0f} images/s)")
    print(f"  numpy / torch time per epoch: {e['numpy']['seconds_per_epoch'] / e['torch']['seconds_per_epoch']:.2f}x")
    args.out.write_text(json.dumps({"machine": machine(), "conv_pool": rows, "engines": e}, indent=2) + "\n")


if __name__ == "__main__":
    main()
