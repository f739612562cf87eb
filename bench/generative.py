"""Generative models on Fashion-MNIST (2-core CPU, fp32), against real compressors and the real-vs-real floor:

1. likelihood: bits per dimension on the 8-bit test split of an independent per-pixel categorical model fitted on
   train, PNG per image (maximum compression), PNG and WebP lossless over one 100x100 mosaic of the test set,
   bzip2 and xz over the raw test set; then PixelCNN, gated PixelCNN and the VAE (discretized logistic decoder:
   the ELBO bound and the importance-sampled NLL), and the VAE on binarized images in nats (the published scale);
2. training speed of PixelCNN against a Row LSTM of the same width on the same batches, and the cost of sampling;
3. sample quality: FID and KID of DCGAN, WGAN-GP and DDPM (and the VAE) over the features of a convnet trained on
   Fashion-MNIST, against the floor (training against test images, same extractor and count), class coverage of
   1,000 samples, and the time to generate 64.

    python bench/generative.py [--scale 1.0] [--quick]     # --scale multiplies every model's epochs
"""

from __future__ import annotations

import argparse
import bz2
import io
import json
import lzma
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import visrec
from baseline import machine
from visrec.data import load_dataset
from visrec.runs import Run

HERE = Path(__file__).resolve().parent


def codecs(train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Bits per dimension of the test set (N, 28, 28) uint8 under real codecs and a per-pixel categorical model."""
    dims = test.size
    counts = np.stack([np.bincount(train[:, i, j], minlength=256) for i in range(28) for j in range(28)]) + 0.5
    probs = counts / counts.sum(1, keepdims=True)  # add-1/2 smoothing: no value has probability 0
    flat = test.reshape(len(test), -1)
    indep = -np.log2(probs[np.arange(784)[None, :], flat]).sum() / dims

    def png(a: np.ndarray) -> int:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", optimize=True, compress_level=9)
        return len(buf.getvalue())

    per_image = sum(png(a) for a in test)
    mosaic = test[:10000].reshape(100, 100, 28, 28).transpose(0, 2, 1, 3).reshape(2800, 2800)
    buf = io.BytesIO()
    Image.fromarray(mosaic).save(buf, "WEBP", lossless=True, quality=100, method=6)
    raw = test.tobytes()
    return {"independent per-pixel categorical (fitted on train)": indep,
            "PNG per image (maximum compression)": per_image * 8 / dims,
            "PNG over one 100x100 mosaic of the test set": png(mosaic) * 8 / dims,
            "WebP lossless over that mosaic": len(buf.getvalue()) * 8 / dims,
            "bzip2 over the raw test set": len(bz2.compress(raw, 9)) * 8 / dims,
            "xz over the raw test set": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) * 8 / dims}


def train(tmp: Path, name: str, epochs: int, kwargs: dict, extra: dict | None = None, label: str = "") -> Run:
    t = time.perf_counter()
    run = visrec.train("fashion-mnist", task="generate", model=name, epochs=epochs, out=str(tmp / (label or name)),
                       progress=False, overrides={"model.kwargs": kwargs, **(extra or {})})
    r = Run(run.path)
    print(f"   {name} ({json.dumps(kwargs)}): {r.summary['params']:,} parameters, {epochs} epoch(s), "
          f"{r.summary['train_seconds']:.0f} s of training ({time.perf_counter() - t:.0f} s with evaluation)",
          flush=True)
    return r


def sample_seconds(run: Run, n: int = 64, steps: int | None = None) -> float:
    m = run.load_model().model
    t = time.perf_counter()
    m.sample(n, generator=torch.Generator().manual_seed(0), steps=steps)
    return time.perf_counter() - t


def speed(tmp: Path) -> dict:
    """PixelCNN against a Row LSTM of the same width: training images/s on the same 100 batches of 64."""
    from visrec.models import create_model

    x = torch.from_numpy(load_dataset("fashion-mnist").train.images[:6400].numpy()).float()
    out = {}
    for name, kw in (("pixelcnn", {"width": 64, "blocks": 6}), ("row_lstm", {"width": 64})):
        torch.manual_seed(0)
        m = create_model(name, in_chans=1, num_classes=1, image_size=28, **kw)
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        t = time.perf_counter()
        for b in x.split(64):
            loss = m(b)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t
        m.eval()
        t = time.perf_counter()
        m.sample(8, generator=torch.Generator().manual_seed(0))
        out[name] = {"images_per_s": len(x) / train_s, "bpd_after": float(loss.detach()),
                     "sample8_s": time.perf_counter() - t, "params": sum(p.numel() for p in m.parameters())}
        print(f"   {name}: {out[name]['images_per_s']:.0f} training images/s ({out[name]['params']:,} parameters; "
              f"{out[name]['bpd_after']:.3f} bits/dim after 100 steps), 8 samples in {out[name]['sample8_s']:.1f} s",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every model's epochs")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny epochs, checks the script only")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}", flush=True)
    ds = load_dataset("fashion-mnist")
    tr, te = ds.train.images[:, 0].numpy(), ds.test.images[:, 0].numpy()
    print("1. bits/dim on the Fashion-MNIST test split (8-bit, 10,000 images):", flush=True)
    res: dict = {"machine": machine(), "codecs": codecs(tr, te)}
    for k, v in res["codecs"].items():
        print(f"   {k:55s} {v:.3f}", flush=True)

    def ep(n: int) -> int:
        return 1 if args.quick else max(1, round(n * args.scale))

    quick = {"data.subset": 2000, "eval.samples": 100, "eval.nll_images": 50, "eval.importance_samples": 50,
             "eval.sample_steps": 10} if args.quick else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs: dict[str, Run] = {}
        runs["pixelcnn"] = train(tmp, "pixelcnn", ep(2), {"width": 64, "blocks": 6}, quick)
        runs["gated_pixelcnn"] = train(tmp, "gated_pixelcnn", ep(2), {"width": 32, "layers": 5, "kernel": 5}, quick)
        runs["vae"] = train(tmp, "vae", ep(6), {"latent": 32, "width": 32, "likelihood": "logistic"}, quick)
        binary = train(tmp, "vae", ep(6), {"latent": 32, "width": 32, "likelihood": "bernoulli"},
                       {**quick, "eval.feature_run": "none"}, label="vae_binary")
        lik = {}
        for name in ("pixelcnn", "gated_pixelcnn", "vae"):
            s = runs[name].summary
            lik[name] = {"bpd": s["test_bpd"], "train_seconds": s["train_seconds"]}
            if name == "vae":
                lik[name]["nll_bpd"] = s["test_nll_bpd"]
        best_codec = min(res["codecs"].values())
        print(f"   {'PixelCNN':55s} {lik['pixelcnn']['bpd']:.3f}", flush=True)
        print(f"   {'gated PixelCNN':55s} {lik['gated_pixelcnn']['bpd']:.3f}", flush=True)
        print(f"   {'VAE, discretized logistic: the ELBO bound':55s} {lik['vae']['bpd']:.3f}", flush=True)
        print(f"   {'VAE: importance-sampled NLL (k=500, 1,000 test images)':55s} {lik['vae']['nll_bpd']:.3f}",
              flush=True)
        best = min(lik["pixelcnn"]["bpd"], lik["gated_pixelcnn"]["bpd"])
        print(f"   the PixelCNN family against the best codec ({best_codec:.3f}): {best:.3f}, "
              f"{(1 - best / best_codec) * 100:.1f}% below (target: <= 3.0 bits/dim)", flush=True)
        bs = binary.summary
        print(f"   VAE on binarized Fashion-MNIST (each pixel on with probability value/255, test bits drawn once "
              f"with seed 0): negative ELBO {-bs['test_elbo_nats']:.1f} nats, importance-sampled NLL "
              f"{bs['test_nll_nats']:.1f} nats per image", flush=True)
        res["likelihood"] = lik
        res["binarized_vae"] = {"elbo_nats": bs["test_elbo_nats"], "nll_nats": bs["test_nll_nats"]}

        print("2. training speed on the same 100 batches of 64, and sampling:", flush=True)
        res["speed"] = speed(tmp)

        print("3. sample quality (FID and KID over the features of a convnet trained on Fashion-MNIST):", flush=True)
        runs["dcgan"] = train(tmp, "dcgan", ep(5), {"latent": 64, "width": 64}, quick)
        runs["wgan_gp"] = train(tmp, "wgan_gp", ep(3), {"latent": 64, "width": 64}, quick)
        runs["ddpm"] = train(tmp, "ddpm", ep(2), {"width": 32}, quick)
        quality = {}
        floor = None
        for name in ("dcgan", "wgan_gp", "ddpm", "vae"):
            s = runs[name].summary
            floor = s.get("test_fid_floor", floor)
            steps = runs[name].config.eval.sample_steps if name == "ddpm" else None
            quality[name] = {k: s.get(f"test_{k}") for k in ("fid", "kid", "fid_floor", "kid_floor", "samples",
                                                              "classes_present", "top_class_share", "d_acc")}
            quality[name]["train_seconds"] = s["train_seconds"]
            quality[name]["sample64_s"] = sample_seconds(runs[name], 64, steps)
            print(f"   {name:8s} FID {s['test_fid']:7.2f} (floor {s['test_fid_floor']:.2f})  KID {s['test_kid']:.4f} "
                  f"(floor {s['test_kid_floor']:.4f})  classes {s['test_classes_present']}/10, top class "
                  f"{s['test_top_class_share']:.0%}  trained {s['train_seconds']:.0f} s  64 samples "
                  f"{quality[name]['sample64_s']:.2f} s" + (f" (DDIM {steps} steps)" if steps else ""), flush=True)
        for name in ("pixelcnn", "gated_pixelcnn"):
            quality[name] = {"sample64_s": sample_seconds(runs[name], 64)}
            print(f"   {name}: 64 samples {quality[name]['sample64_s']:.1f} s (28x28 network passes)", flush=True)
        t = time.perf_counter()
        runs["ddpm"].load_model().model.sample(64, generator=torch.Generator().manual_seed(0))
        quality["ddpm"]["sample64_ancestral_s"] = time.perf_counter() - t
        print(f"   ddpm: 64 samples with all 1000 ancestral steps {quality['ddpm']['sample64_ancestral_s']:.1f} s",
              flush=True)
        print(f"   feature network: {runs['dcgan'].summary.get('feature_network')}", flush=True)
        res["quality"] = quality
        grids = {name: runs[name].path / "samples" / "test.png" for name in runs}
        _figure(grids, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def _figure(grids: dict[str, Path], path: Path) -> None:
    from visrec.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6))
    for ax, (name, p) in zip(axes, grids.items(), strict=True):
        ax.imshow(np.asarray(Image.open(p)))
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    save_figure(fig, path, dpi=90)


if __name__ == "__main__":
    main()
