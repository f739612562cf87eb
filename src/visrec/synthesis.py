"""Artistic image synthesis from a network's features: style transfer by optimization, texture synthesis and
DeepDream, plus the one-pass stylization of a fast style run.

    stylize   Gatys, Ecker and Bethge 2016: an image whose features match the content image's at the content
              layers and whose Gram matrices match the style image's at the style layers, with a total-variation
              term; L-BFGS or Adam, from the content image or from noise; optionally coarse to fine over `scales`
              and luminance-only (the content's colours kept; Gatys et al. 2016b)
    texture   the same with the Gram terms alone, from noise (Gatys et al. 2015)
    dream     gradient ascent on the mean squared activation of one layer (Mordvintsev et al. 2015): octaves
              (coarse to fine, the detail carried up), random jitter, gradients normalized by their mean magnitude
    stylize_with_run   a fast style run's transformation network over images (Johnson et al. 2016)

Images are floats 0..1 (1, C, H, W) inside; files are read by visrec's image rules (EXIF rotation, alpha on white,
16-bit scaled, CMYK to RGB) and resized so the longer side is `size`, aspect kept. Results are written as a PNG and
a JSON of the settings and final losses beside it, both atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from .errors import VisrecError
from .models.style import LossNet, PerceptualLoss, rgb_to_yiq, yiq_to_rgb
from .tasks.style import fit_longer_side, read_style_image, resolve_loss_net

ImageLike = str | Path | torch.Tensor


@dataclass
class Synthesis:
    """A synthesized image (float (1, C, H, W), 0..1), how it was made, and what it reached."""

    image: torch.Tensor
    settings: dict[str, Any]
    losses: dict[str, float]
    seconds: float
    history: list[float] = field(default_factory=list)  # the objective after each step

    def uint8(self) -> torch.Tensor:
        return (self.image[0].clamp(0, 1) * 255).round().byte()

    def save(self, path: str | Path) -> Path:
        """`path` (.png) and `path` with .json: the settings, the final losses, the seconds taken."""
        import io

        from PIL import Image

        from .io import write_bytes, write_json

        path = Path(path)
        if path.suffix.lower() != ".png":
            raise VisrecError(f"--out {path} must end in .png", "name the output file.png")
        if path.parent and not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        a = self.uint8().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, "PNG")
        write_bytes(path, buf.getvalue())
        write_json(path.with_suffix(".json"), {"settings": self.settings, "losses": self.losses,
                                               "seconds": round(self.seconds, 3), "history": self.history})
        return path


def load_image(image: ImageLike, size: int | None, channels: int = 3, max_pixels: int | None = None
               ) -> torch.Tensor:
    """A file or a tensor as float (1, C, H, W) 0..1 with its longer side `size` (None: as it is)."""
    if isinstance(image, torch.Tensor):
        x = image.float()
        if x.dim() == 3:
            x = x[None]
        if x.dtype == torch.uint8 or x.max() > 1.5:
            x = x / 255.0
        return fit_longer_side(x, size).clamp(0, 1) if size else x
    return read_style_image(image, channels, size, max_pixels)


@contextmanager
def _bar(total: int, label: str, enabled: bool) -> Iterator[Callable[[float], None]]:
    """A progress bar on stderr showing the objective; `update(value)` advances it one step."""
    if not enabled:
        yield lambda value: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=True) as p:
        task = p.add_task(label, total=total, loss="")
        yield lambda value: p.update(task, advance=1, loss=f"loss {value:.4g}")


def _optimize(x: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor], steps: int, optimizer: str,
              lr: float | None, update: Callable[[float], None]) -> tuple[torch.Tensor, list[float]]:
    """Minimize `objective(x)` over pixels kept in 0..1: L-BFGS (strong Wolfe line search; one step = one
    iteration) or Adam. Returns the image and the objective after each step."""
    x = x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    history: list[float] = []
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([x], lr=lr or 1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            with torch.no_grad():
                x.clamp_(0, 1)
            opt.zero_grad()
            loss = objective(x)
            loss.backward()
            return loss

        for _ in range(steps):
            value = float(opt.step(closure).detach())
            history.append(value)
            update(value)
    elif optimizer == "adam":
        opt = torch.optim.Adam([x], lr=lr or 0.02)
        for _ in range(steps):
            opt.zero_grad()
            loss = objective(x)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            history.append(float(loss.detach()))
            update(history[-1])
    else:
        raise VisrecError(f"--optimizer {optimizer} is not valid", "use lbfgs or adam")
    return x.detach().clamp(0, 1), history


def _net(net: str | LossNet, calibration: torch.Tensor, trust: bool = False) -> LossNet:
    return net if isinstance(net, LossNet) else resolve_loss_net(net, calibration, trust=trust)


def _check_common(steps: int, size: int | None, scales: int = 1) -> None:
    if steps < 1:
        raise VisrecError(f"--steps {steps} must be at least 1", "for example --steps 300")
    if size is not None and size < 8:
        raise VisrecError(f"--size {size} is too small", "use --size 64 or more (256 to 512 for photos)")
    if scales < 1:
        raise VisrecError(f"--scales {scales} must be at least 1", "1 (one size) or 2-3 (coarse to fine)")


def _luminance(x: torch.Tensor) -> torch.Tensor:
    return rgb_to_yiq(x)[:, :1]


def stylize(content: ImageLike, style: ImageLike, *, net: str | LossNet = "random_vgg", size: int = 512,
            style_size: int | None = None, steps: int = 300, optimizer: str = "lbfgs", lr: float | None = None,
            init: str = "content", content_weight: float = 1.0, style_weight: float = 5.0, tv_weight: float = 1.0,
            content_layers: Sequence[str] | None = None, style_layers: Sequence[str] | None = None, scales: int = 1,
            preserve_color: bool = False, seed: int = 0, progress: bool = False, max_pixels: int | None = None,
            trust: bool = False) -> Synthesis:
    """Style transfer by optimization (see the module's text). `steps` are spread over the `scales` (each scale
    doubles the size, ending at `size`); `style_size` is the style image's longer side (default: `size`)."""
    _check_common(steps, size, scales)
    if init not in ("content", "noise"):
        raise VisrecError(f"--init {init} is not valid", "use content or noise")
    started = time.perf_counter()
    c_full = load_image(content, size, 3, max_pixels)
    s_full = load_image(style, style_size or size, 3, max_pixels)
    if preserve_color:  # luminance only; the style's luminance matched to the content's mean and spread
        cy, sy = _luminance(c_full), _luminance(s_full)
        s_full = ((sy - sy.mean()) * (cy.std() / sy.std().clamp_min(1e-6)) + cy.mean()).clamp(0, 1)
        c_work = cy
    else:
        c_work = c_full
    lossnet = _net(net, s_full, trust)
    g = torch.Generator().manual_seed(seed)
    x = None
    history: list[float] = []
    final: dict[str, float] = {}
    per_scale = _split(steps, scales)
    with _bar(steps, "stylize", progress) as update:
        for k in range(scales):
            f = 2.0 ** (k - scales + 1)
            c = fit_longer_side(c_work, max(8, round(size * f))) if f < 1 else c_work
            s = fit_longer_side(s_full, max(8, round((style_size or size) * f))) if f < 1 else s_full
            loss = PerceptualLoss(lossnet, s, content_layers=content_layers, style_layers=style_layers,
                                  content_weight=content_weight, style_weight=style_weight, tv_weight=tv_weight)
            lossnet.check_size(tuple(c.shape[-2:]), loss.content_layers + loss.style_layers, "the content image")
            target = loss.content_targets(c)
            if x is None:
                x = c.clone() if init == "content" else torch.rand(c.shape, generator=g)
            else:
                x = F.interpolate(x, size=c.shape[-2:], mode="bilinear", align_corners=False)
            x, h = _optimize(x, lambda v, loss=loss, target=target: loss(v, target).total.sum(), per_scale[k],
                             optimizer, lr, update)
            history += h
            with torch.no_grad():
                final = loss(x, target).as_floats()
    out = yiq_to_rgb(torch.cat([x, rgb_to_yiq(c_full)[:, 1:]], 1)).clamp(0, 1) if preserve_color else x
    settings = {"method": "style transfer by optimization (Gatys et al.)", "content": _name(content),
                "style": _name(style), "net": lossnet.description, "size": size, "style_size": style_size or size,
                "steps": steps, "optimizer": optimizer, "lr": lr, "init": init, "content_weight": content_weight,
                "style_weight": style_weight, "tv_weight": tv_weight, "content_layers": list(loss.content_layers),
                "style_layers": list(loss.style_layers), "scales": scales, "preserve_color": preserve_color,
                "seed": seed, "output_size": list(out.shape[-2:])}
    return Synthesis(out, settings, final, time.perf_counter() - started, history)


def _split(steps: int, parts: int) -> list[int]:
    base = [steps // parts] * parts
    for i in range(steps - sum(base)):
        base[-1 - i] += 1
    return [max(1, b) for b in base]


def _name(image: ImageLike) -> str:
    return str(image) if not isinstance(image, torch.Tensor) else f"tensor {tuple(image.shape)}"


def texture(style: ImageLike, *, net: str | LossNet = "random_multiscale", size: int = 256,
            style_size: int | None = None, steps: int = 300, optimizer: str = "lbfgs", lr: float | None = None,
            style_layers: Sequence[str] | None = None, tv_weight: float = 0.0, seed: int = 0, progress: bool = False,
            max_pixels: int | None = None, trust: bool = False) -> Synthesis:
    """A `size` x `size` texture whose Gram matrices match the style image's, optimized from uniform noise; the
    losses include `noise_style`, the Gram loss of the starting noise, for scale."""
    _check_common(steps, size)
    started = time.perf_counter()
    s = load_image(style, style_size or size, 3, max_pixels)
    lossnet = _net(net, s, trust)
    loss = PerceptualLoss(lossnet, s, style_layers=style_layers, content_weight=0.0, style_weight=1.0,
                          tv_weight=tv_weight)
    lossnet.check_size((size, size), loss.style_layers, "the texture")
    x0 = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        noise = loss(x0).as_floats()["style"]
    with _bar(steps, "texture", progress) as update:
        x, history = _optimize(x0, lambda v: loss(v).total.sum(), steps, optimizer, lr, update)
    with torch.no_grad():
        final = loss(x).as_floats()
    final["noise_style"] = noise
    settings = {"method": "texture synthesis from Gram matrices (Gatys et al. 2015)", "style": _name(style),
                "net": lossnet.description, "size": size, "style_size": style_size or size, "steps": steps,
                "optimizer": optimizer, "lr": lr, "style_layers": list(loss.style_layers), "tv_weight": tv_weight,
                "seed": seed}
    return Synthesis(x, settings, final, time.perf_counter() - started, history)


def activation_norm(net: LossNet, image: torch.Tensor, layer: str) -> float:
    """The root mean square of `layer`'s activations for an image (0..1)."""
    with torch.no_grad():
        return float(net(image, [layer])[layer].pow(2).mean().sqrt())


def dream(image: ImageLike, *, net: str | LossNet = "random_vgg", layer: str | None = None, size: int | None = 512,
          octaves: int = 4, octave_scale: float = 1.4, steps: int = 20, lr: float = 0.01, jitter: int = 16,
          seed: int = 0, progress: bool = False, max_pixels: int | None = None, trust: bool = False) -> Synthesis:
    """DeepDream: `steps` normalized gradient-ascent steps of size `lr` per octave on the mean squared activation
    of `layer` (default: the network's `dream_layer`), with a random circular shift of up to `jitter` pixels before
    each; octaves from 1/octave_scale^(octaves-1) of the size up, each adding the detail found so far."""
    _check_common(steps, size)
    if octaves < 1 or octave_scale <= 1.0:
        raise VisrecError(f"--octaves {octaves} / octave scale {octave_scale}: need at least 1 octave and a scale "
                          "above 1", "for example --octaves 4 (scale 1.4)")
    started = time.perf_counter()
    base = load_image(image, size, 3, max_pixels)
    lossnet = _net(net, base, trust)
    layer = layer or lossnet.dream_layer
    lossnet.check_layers([layer])
    h, w = base.shape[-2:]
    shapes = [(max(1, round(h / octave_scale**i)), max(1, round(w / octave_scale**i))) for i in range(octaves)][::-1]
    deep = lossnet.downsampling.get(layer, 1)
    shapes = [s for s in shapes if min(s) >= 2 * deep] or [(h, w)]
    lossnet.check_size((h, w), [layer])
    g = torch.Generator().manual_seed(seed)
    detail = torch.zeros(1, 3, *shapes[0])
    before = activation_norm(lossnet, base, layer)
    history: list[float] = []
    with _bar(steps * len(shapes), "dream", progress) as update:
        for shape in shapes:
            octave_base = F.interpolate(base, size=shape, mode="bilinear", align_corners=False, antialias=True)
            detail = F.interpolate(detail, size=shape, mode="bilinear", align_corners=False)
            x = (octave_base + detail).clamp(0, 1)
            for _ in range(steps):
                dy, dx = (torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist() if jitter else (0, 0))
                xs = torch.roll(x, (dy, dx), (2, 3)).requires_grad_(True)
                objective = lossnet(xs, [layer])[layer].pow(2).mean()
                (grad,) = torch.autograd.grad(objective, xs)
                grad = torch.roll(grad, (-dy, -dx), (2, 3))
                x = (x + lr * grad / grad.abs().mean().clamp_min(1e-12)).clamp(0, 1).detach()
                history.append(float(objective.detach()))
                update(history[-1])
            detail = x - octave_base
    after = activation_norm(lossnet, x, layer)
    settings = {"method": "DeepDream (Mordvintsev et al. 2015)", "image": _name(image), "net": lossnet.description,
                "layer": layer, "size": size, "octaves": len(shapes), "octave_scale": octave_scale, "steps": steps,
                "lr": lr, "jitter": jitter, "seed": seed}
    return Synthesis(x, settings, {"activation_rms_before": before, "activation_rms_after": after},
                     time.perf_counter() - started, history)


def stylize_with_run(run, images: Sequence[ImageLike], *, size: int | None = None, which: str = "auto",
                     device: str = "cpu", max_pixels: int | None = None) -> list[Synthesis]:
    """Each image through a fast style run's transformation network, one forward pass each (`size`: the longer
    side; None keeps the image's own size)."""
    from .runs import Run
    from .tasks import task_class

    run = run if isinstance(run, Run) else Run(run)
    predictor = task_class(run.config.task.name).Predictor
    if predictor is None or not predictor.makes_images:
        raise VisrecError(f"{run.path} is a {run.config.task.name} run, not a style run",
                          "train one with: visrec train folder:PHOTOS --task style --style STYLE.jpg; or stylize by "
                          "optimization: visrec stylize CONTENT STYLE")
    lm = run.load_model(which, device=device)
    out = []
    for image in images:
        started = time.perf_counter()
        x = load_image(image, size, lm.in_chans, max_pixels)
        with torch.no_grad():
            y = lm.model(x.to(next(lm.model.parameters()).device) * 255.0).cpu() / 255.0
        settings = {"method": "fast style transfer (Johnson et al.)", "content": _name(image), "run": str(run.path),
                    "style": run.config.task.options.get("style", ""), "size": size, "output_size": list(y.shape[-2:])}
        out.append(Synthesis(y.clamp(0, 1), settings, {}, time.perf_counter() - started))
    return out


def default_out(*parts: ImageLike, suffix: str) -> Path:
    """`<stem>[-<stem>]-<suffix>.png` in the current folder."""
    stems = [Path(p).stem if not isinstance(p, torch.Tensor) else "image" for p in parts]
    return Path("-".join([*stems, suffix]) + ".png")


__all__ = ["Synthesis", "activation_norm", "default_out", "dream", "load_image", "stylize",
           "stylize_with_run", "texture"]
