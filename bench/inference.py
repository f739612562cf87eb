"""Inference throughput of the default run on this CPU: torch eager (NCHW), eager channels_last, torch as
`Run.load_model` gives it (the weights' layout it chose), torch.compile and the run's ONNX export through
onnxruntime, at batch 256 and batch 1, with whether each gives the same predictions as eager on 2,000 test images
(the same run, the same inputs, measured in one process). Then end to end, as a user meets them: `Run.evaluate` on
the 10,000 test images and the `visrec predict` command on one image, with `backend="torch"` against the default
`auto` (onnxruntime on CPU), the first call paying for the ONNX export, then the best of three alternating calls
each. `--preset fmnist-fast` measures that
preset's run instead (written to inference_fmnist-fast.json), with batches of 16 and 64 too, where the two backends
cross.

    python bench/inference.py [--preset P] [--epochs 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import visrec
from baseline import machine
from visrec.export import WithPreprocessing, export_run
from visrec.runs import Run, dataset_from_config


def rate(fn, x: torch.Tensor, repeats: int) -> float:
    """Images per second: the median of `repeats` timed calls after three warm-up calls."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return len(x) / sorted(times)[len(times) // 2]


def end_to_end(path: Path, tmp: Path) -> dict:
    """Run.evaluate on the test split and `visrec predict` on one image: torch against auto (onnxruntime)."""
    import shutil
    import subprocess
    import sys

    from PIL import Image

    out: dict = {}
    print("end to end (the same run):", flush=True)
    # the first auto call exports the graph; then torch and auto alternate three times each (the best of each
    # kept), so a drift of the machine's speed touches both alike
    for i, backend in enumerate(("auto", "torch", "auto", "torch", "auto", "torch", "auto")):
        run = Run(path)
        t = time.perf_counter()
        r = run.evaluate(backend=backend, device="cpu")
        seconds = time.perf_counter() - t
        key = "evaluate_auto_first" if i == 0 else f"evaluate_{backend}"
        if i == 0 or seconds < out.get(key, {}).get("seconds", float("inf")):
            out[key] = {"seconds": seconds, "acc": r.acc, "backend": r.backend}
        print(f"  Run.evaluate(backend={backend!r}){' (exports the graph)' if i == 0 else ''}: "
              f"{seconds:.2f} s, accuracy {r.acc:.4f}, ran on {r.backend}", flush=True)
    img = dataset_from_config(Run(path).config).test.images[0, 0].numpy()
    Image.fromarray(img).save(tmp / "one.png")
    exe = shutil.which("visrec") or str(Path(sys.executable).parent / "visrec")
    for backend in ("torch", "auto"):
        t = time.perf_counter()
        subprocess.run([exe, "predict", str(path), str(tmp / "one.png"), "--backend", backend], check=True,
                       stdout=subprocess.DEVNULL)
        out[f"predict_{backend}"] = time.perf_counter() - t
        print(f"  visrec predict RUN one.png --backend {backend}: {out[f'predict_{backend}']:.2f} s wall clock "
              "(start-up included)", flush=True)
    base = out["evaluate_torch"]["seconds"]
    print(f"  evaluate, best of three: auto (cached graph) {base / out['evaluate_auto']['seconds']:.2f}x torch; the "
          f"first auto call, which exports, {base / out['evaluate_auto_first']['seconds']:.2f}x", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=None, help="measure this preset's run rather than the default run")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    here = Path(__file__)
    out = args.out or (here.with_name(f"inference_{args.preset}.json") if args.preset else here.with_suffix(".json"))
    sizes = (256, 64, 16, 1) if args.preset else (256, 1)
    torch.set_num_threads(2)
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(visrec.train("fashion-mnist", preset=args.preset, epochs=args.epochs, out=str(Path(tmp) / "run"),
                               progress=False).path)
        lm = run.load_model()
        print(f"the {args.preset or 'default'} run: {run.config.model.name}, {run.summary['params']:,} parameters, "
              f"test accuracy {run.summary['test_acc']:.4f} ({args.epochs} epochs)", flush=True)
        test = dataset_from_config(run.config).test.images[:2000]
        pixels = test.float()

        def own_copy(memory_format: torch.memory_format) -> WithPreprocessing:
            """Each variant gets its own copy of the network: `.to(memory_format=...)` changes a module in place,
            and shared weights would leave every variant in the last layout asked for."""
            net = copy.deepcopy(lm.model).float().to(memory_format=memory_format)
            return WithPreprocessing(net, lm.normalizer).eval()

        model = own_copy(torch.contiguous_format)
        cl = own_copy(torch.channels_last)
        loaded = WithPreprocessing(lm.model, lm.normalizer).eval()  # the weights' layout Run.load_model chose
        onnx_path = export_run(run.path, "onnx", Path(tmp) / "model.onnx")
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

        def eager(x):
            with torch.inference_mode():
                return model(x)

        def as_loaded(x):
            with torch.inference_mode():
                return loaded(x)

        def channels_last(x):
            with torch.inference_mode():
                return cl(x.contiguous(memory_format=torch.channels_last))

        t = time.perf_counter()
        compiled_model = torch.compile(own_copy(torch.contiguous_format), dynamic=False)

        def compiled(x):
            with torch.inference_mode():
                return compiled_model(x)

        for b in sizes:
            compiled(pixels[:b])
        compile_s = time.perf_counter() - t

        def onnx(x):
            return torch.from_numpy(sess.run(None, {"pixels": x.numpy()})[0])

        backends = {"eager (NCHW)": eager, "eager channels_last": channels_last, "torch as loaded": as_loaded,
                    "torch.compile": compiled, "onnxruntime": onnx}
        reference = torch.cat([eager(c) for c in pixels.split(256)]).argmax(1)
        res = {"machine": machine(), "model": run.config.model.name, "compile_seconds": compile_s, "backends": {}}
        columns = "".join(f" {f'batch {b} img/s':>16s}" for b in sizes)
        print(f"{'backend':22s}{columns} {'same predictions':>17s}", flush=True)
        for name, fn in backends.items():
            preds = torch.cat([fn(c) for c in pixels.split(256)]).argmax(1)
            same = float((preds == reference).float().mean())
            rates = {f"batch{b}": rate(fn, pixels[:b], args.repeats * (10 if b == 1 else 1))
                     for b in sizes}
            res["backends"][name] = {**rates, "same_predictions": same}
            print(f"{name:22s}" + "".join(f" {r:16.0f}" for r in rates.values()) + f" {same:16.2%}", flush=True)
        print(f"torch.compile took {compile_s:.1f} s to compile ({len(sizes)} shapes)", flush=True)
        res["end_to_end"] = end_to_end(run.path, Path(tmp))
        base = res["backends"]["eager (NCHW)"]
        for name, r in res["backends"].items():
            print(f"   {name}: " + ", ".join(f"{r[f'batch{b}'] / base[f'batch{b}']:.2f}x eager at batch {b}"
                                             for b in sizes), flush=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
