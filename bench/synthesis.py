"""Image synthesis on the committed content and style images (bench/images, drawn by
scripts/make_synthesis_images.py), 2-core CPU, fp32:

1. style transfer by optimization at SIZE px on the random VGG loss network: L-BFGS and Adam from the content
   image, L-BFGS from noise, coarse to fine (3 scales), luminance only; final content, style and TV losses, seconds;
2. fast style transfer: the transformation network trained through visrec's loop on landscape variants (128 px),
   then one forward pass at SIZE px: its losses under the same loss as 1, and seconds per image against
   optimization's (the ratio Johnson et al. report as about 1000x on a GPU);
3. texture synthesis from each loss network (random multi-scale, random VGG, a Fashion-MNIST classification run,
   and a torchvision VGG-19 file when --vgg19 gives one): the Gram loss reached against that of the starting noise;
4. DeepDream on the random VGG and on the run: the layer's activation RMS before and after;

and one figure of everything (bench/synthesis.png, shown in the README).

    python bench/synthesis.py [--size 256] [--steps 200] [--train-images 800] [--vgg19 PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import visrec
from baseline import machine
from visrec.plotting import pyplot, save_figure
from visrec.runs import Run
from visrec.synthesis import Synthesis, dream, load_image, stylize, stylize_with_run, texture
from visrec.tasks.style import resolve_loss_net

HERE = Path(__file__).resolve().parent
CONTENT, STYLE = HERE / "images" / "content.png", HERE / "images" / "style.png"
sys.path.insert(0, str(HERE.parent / "scripts"))


def optimization(size: int, steps: int) -> dict[str, Synthesis]:
    style = load_image(STYLE, size)
    net = resolve_loss_net("random_vgg", style)  # one calibrated network for every method
    runs = {
        "L-BFGS from the content": dict(optimizer="lbfgs"),
        "Adam from the content": dict(optimizer="adam"),
        "L-BFGS from noise": dict(optimizer="lbfgs", init="noise"),
        "L-BFGS, 3 scales": dict(optimizer="lbfgs", scales=3),
        "L-BFGS, colour kept": dict(optimizer="lbfgs", preserve_color=True),
    }
    out = {}
    for name, kw in runs.items():
        r = stylize(CONTENT, STYLE, net=net if not kw.get("preserve_color") else "random_vgg", size=size,
                    steps=steps, **kw)
        out[name] = r
        print(f"   {name:26s} {r.seconds:7.1f} s   total {r.losses['total']:.4f}  content {r.losses['content']:.4f}  "
              f"style {r.losses['style']:.4f}  tv {r.losses['tv']:.5f}", flush=True)
    return out


def fast(tmp: Path, size: int, n_images: int, epochs: int) -> tuple[Synthesis, dict]:
    from make_synthesis_images import variants

    photos = tmp / "landscapes"
    variants(photos, n_images, size=128)
    run = visrec.train(f"folder:{photos}", task="style", epochs=epochs, out=str(tmp / "fast"), progress=False,
                       overrides={"task.style": str(STYLE), "task.style_size": 128})
    r = Run(run.path)
    seconds = r.summary["train_seconds"]
    out = stylize_with_run(r, [CONTENT], size=size)[0]
    times = []
    for _ in range(5):  # warm, then the median of five
        t = time.perf_counter()
        stylize_with_run(r, [CONTENT], size=size)
        times.append(time.perf_counter() - t)
    out.seconds = sorted(times)[2]
    # its result scored by the loss optimization minimizes (style targets at SIZE, not the 128 px it trained at)
    from visrec.models.style import PerceptualLoss

    style = load_image(STYLE, size)
    loss = PerceptualLoss(resolve_loss_net("random_vgg", style), style)
    with torch.no_grad():
        out.losses = loss(out.image, load_image(CONTENT, size)).as_floats()
    info = {"train_seconds": seconds, "train_images": n_images, "epochs": epochs, "params": r.summary["params"],
            "test_loss": r.summary["test_loss"], "run": str(run.path)}
    return out, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-images", type=int, default=800)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--vgg19", type=Path, default=None, help="a torchvision VGG-19 weights file, if you have one")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and steps: checks the script, not the numbers")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    if args.quick:
        args.size, args.steps, args.train_images, args.epochs = 64, 5, 16, 1
    torch.set_num_threads(2)
    print(f"machine: {machine()}", flush=True)
    print(f"1. style transfer by optimization, {args.size} px, {args.steps} steps, random VGG loss network "
          "(content relu3_1; style relu1_1..relu4_1; weights content 1, style 5, tv 1):", flush=True)
    opt = optimization(args.size, args.steps)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"2. fast style transfer: transformnet trained on {args.train_images} landscape variants (128 px), "
              f"{args.epochs} epochs, batch 4, Adam 1e-3:", flush=True)
        ff, info = fast(tmp, args.size, args.train_images, args.epochs)
        best = opt["L-BFGS from the content"]
        print(f"   trained in {info['train_seconds']:.0f} s ({info['params']:,} parameters), test loss "
              f"{info['test_loss']:.4f}", flush=True)
        print(f"   at {args.size} px: total {ff.losses['total']:.4f}  content {ff.losses['content']:.4f}  "
              f"style {ff.losses['style']:.4f}  tv {ff.losses['tv']:.5f}", flush=True)
        print(f"   seconds per image: optimization (L-BFGS, {args.steps} steps) {best.seconds:.1f} s, feed-forward "
              f"{ff.seconds * 1000:.1f} ms: {best.seconds / ff.seconds:.0f}x faster", flush=True)

        print("3. texture synthesis from noise, L-BFGS, "
              f"{args.size} px, {args.steps} steps: the Gram loss reached (noise's in brackets):", flush=True)
        clf = visrec.train("fashion-mnist", model="convnet", epochs=1, out=str(tmp / "clf"), progress=False,
                           overrides={"data.subset": 20000})
        print(f"   (the run: convnet on 20k Fashion-MNIST images, 1 epoch, test accuracy "
              f"{Run(clf.path).summary['test_acc']:.4f}; gray, so it sees the luminance)", flush=True)
        nets = {"random_multiscale": "random_multiscale", "random_vgg": "random_vgg", "fashion-mnist run":
                str(clf.path)}
        if args.vgg19:
            nets["vgg19 (torchvision file)"] = f"vgg19:{args.vgg19}"
        else:
            print("   vgg19: not measured (no weights file on this machine; pass --vgg19 PATH)")
        textures = {}
        for name, spec in nets.items():
            r = texture(STYLE, net=spec, size=args.size, steps=args.steps)
            textures[name] = r
            print(f"   {name:22s} {r.seconds:7.1f} s   Gram loss {r.losses['style']:.4f} "
                  f"({r.losses['noise_style']:.2f})", flush=True)

        print("4. DeepDream, 4 octaves x 20 steps:", flush=True)
        dreams = {}
        for name, spec, layer in (("random_vgg relu3_1", "random_vgg", "relu3_1"),
                                  ("fashion-mnist run stage3", str(clf.path), "stage3")):
            r = dream(CONTENT, net=spec, layer=layer, size=args.size)
            dreams[name] = r
            print(f"   {name:26s} {r.seconds:6.1f} s   activation RMS {r.losses['activation_rms_before']:.3f} -> "
                  f"{r.losses['activation_rms_after']:.3f}", flush=True)

    figure(opt, ff, textures, dreams, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps({
        "machine": machine(), "size": args.size, "steps": args.steps,
        "optimization": {k: {"losses": v.losses, "seconds": v.seconds} for k, v in opt.items()},
        "fast": {**info, "losses": ff.losses, "seconds_per_image": ff.seconds,
                 "speedup_over_lbfgs": opt["L-BFGS from the content"].seconds / ff.seconds},
        "texture": {k: {"losses": v.losses, "seconds": v.seconds, "net": v.settings["net"]}
                    for k, v in textures.items()},
        "dream": {k: {"losses": v.losses, "seconds": v.seconds} for k, v in dreams.items()},
    }, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def figure(opt: dict, ff: Synthesis, textures: dict, dreams: dict, path: Path) -> None:
    plt = pyplot()
    row1 = [("content", load_image(CONTENT, None)), ("style", load_image(STYLE, None))]
    row1 += [(k, v.image) for k, v in opt.items()] + [("fast (one pass)", ff.image)]
    row2 = [(f"texture: {k}", v.image) for k, v in textures.items()] + [(f"dream: {k}", v.image)
                                                                         for k, v in dreams.items()]
    cols = max(len(row1), len(row2))
    fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols, 4.6), squeeze=False)
    for r, row in enumerate((row1, row2)):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                title, img = row[c]
                ax.imshow(img[0].permute(1, 2, 0).clamp(0, 1).numpy())
                ax.set_title(title, fontsize=7)
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
