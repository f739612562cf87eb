"""Fast style transfer: a transformation network learns one style from a folder of content images (Johnson, Alahi
and Fei-Fei 2016), with the perceptual losses of a fixed loss network, and then stylizes an image in one forward pass.

    visrec train folder:PHOTOS --task style --style starry.jpg [--set task.style_net=vgg16:PATH]
    visrec stylize photo.jpg --model RUN

The target is the image itself (the content). The loss is content_weight x the feature reconstruction loss at the
loss network's content layers + style_weight x the Gram loss at its style layers + tv_weight x total variation,
each normalized (see `visrec.models.style`); the primary metric is that loss on a split (lower is better). The
loss network is rebuilt from the config (random ones are seeded and calibrated on the style image), so a resumed
run trains against the same one. The test evaluation copies the style image into the run folder (style.png).

`resolve_loss_net` turns a `--net` spec into a loss network; the synthesis commands use it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import NonNeg, NonNegInt
from ..data import Dataset, ImageSet, Normalizer
from ..errors import VisrecError
from ..models.style import (
    LossNet,
    ModelLossNet,
    PerceptualLoss,
    RandomMultiScale,
    RandomVGG,
    VGGLossNet,
)
from ..prediction import Answer, Predictor, Prepared, png_bytes, png_data_uri
from ..training.task import EvalSettings, Evaluation, Task

NET_SPECS = ("random_vgg", "random_multiscale", "vgg16:PATH", "vgg19:PATH", "vgg16-caffe:PATH", "vgg19-caffe:PATH",
             "RUN (a classification run folder)")


def resolve_loss_net(spec: str, calibration: torch.Tensor | None = None, *, seed: int = 0, width: float = 1.0,
                     trust: bool = False) -> LossNet:
    """A loss network from its spec (see NET_SPECS). Random networks are seeded and normalized on `calibration`
    (images 0..1; without it, on seeded noise); `width` thins random VGG's channels (tests, quick looks)."""
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    if kind in ("random_vgg", "random_multiscale") and not arg:
        net: LossNet = RandomVGG(seed=seed, width=width) if kind == "random_vgg" else RandomMultiScale(seed=seed)
        if calibration is None:
            calibration = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        net.calibrate(calibration)
        return net
    if kind in ("vgg16", "vgg19", "vgg16-caffe", "vgg19-caffe"):
        if not arg:
            raise VisrecError(f"--net {spec} needs the weights file: --net {kind}:PATH",
                              "torchvision's VGG weights (e.g. vgg19-dcbb9e9d.pth) cannot be downloaded here; give "
                              "the file you have, or use --net random_vgg")
        from ..io import load_weights

        arch, _, conv = kind.partition("-")
        return VGGLossNet(arch, load_weights(arg, trust=trust), convention=conv or "torchvision", source=arg)
    path = Path(spec).expanduser()
    if path.is_dir():
        from ..run_store import RunFolder as Run

        run = Run(path)
        if run.config.task.name != "classification":
            raise VisrecError(f"--net {spec} is a {run.config.task.name} run", "give a classification run's folder")
        lm = run.load_model(device="cpu")
        if lm.normalizer.mode not in ("channel", "none"):
            raise VisrecError(f"--net {spec} normalizes its inputs with data.normalize={lm.normalizer.mode}, which "
                              "ties them to its training size", "give a run trained with data.normalize=channel")
        return ModelLossNet(lm.model, lm.normalizer, lm.in_chans, source=path.name)
    raise VisrecError(f"--net {spec!r} is not a loss network", f"use one of: {', '.join(NET_SPECS)}")


def fit_longer_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) resized (bilinear, antialiased) so its longer side is `size`, the aspect ratio kept."""
    import torch.nn.functional as F  # noqa: N812

    h, w = image.shape[-2:]
    if max(h, w) == size:
        return image
    s = size / max(h, w)
    hw = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(image.float(), size=hw, mode="bilinear", align_corners=False, antialias=s < 1)


def read_style_image(path: str | Path, channels: int = 3, size: int | None = None,
                     max_pixels: int | None = None) -> torch.Tensor:
    """An image file as float (1, C, H, W) pixels 0..1, EXIF-rotated and converted by visrec's image rules,
    resized so its longer side is `size` (aspect kept)."""
    from PIL import ImageOps

    from ..data.images import open_checked, to_array

    with open_checked(Path(path), max_pixels, "--max-pixels N") as im:
        im = ImageOps.exif_transpose(im)
        try:
            a = to_array(im, channels, oriented=True)
        except (OSError, ValueError) as e:
            raise VisrecError(f"cannot decode image {path}: {e}", "replace the file") from None
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float().contiguous() / 255.0
    return fit_longer_side(x, size).clamp(0, 1) if size else x


class StyleEvaluation(Evaluation):
    def __init__(self, split: str, metrics: dict[str, float], style: torch.Tensor | None):
        super().__init__(split, metrics)
        self.style = style

    def save(self, folder: Path) -> None:
        if self.style is not None and not (folder / "style.png").exists():
            from ..io import write_bytes

            write_bytes(folder / "style.png", _png(self.style))


def _png(image01: torch.Tensor) -> bytes:
    import io

    from PIL import Image

    a = (image01[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Stylized(Answer):
    """The input through the run's transformation network, at the input's own size (a PNG data URI)."""

    image: str
    rgb: Any = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"stylized": self.image}

    def text(self) -> str:
        h, w = self.rgb.shape[:2]
        return f"stylized, {w}x{h}"

    def draw(self, item: Prepared) -> bytes:
        return png_bytes(self.rgb)


class StylePredictor(Predictor):
    """Each input stylized at its own size, one forward pass each (the network is fully convolutional)."""

    outputs = "structured"  # inputs keep their own sizes: eager backends only
    any_size = True
    draws = True
    makes_images = True

    def answer(self, items: list[Prepared], outputs: Any, top_k: list[int]) -> list[Answer]:
        res: list[Answer] = []
        for p in items:
            y = self.lm.model(p.x[None].float().to(self.device)).clamp(0, 255).round().to(torch.uint8)[0].cpu()
            rgb = y.permute(1, 2, 0).numpy()
            res.append(Stylized(png_data_uri(rgb if rgb.shape[2] == 3 else rgb.repeat(3, 2)), rgb))
        return res


@dataclass
class StyleOptions:
    style: str = ""  # the style image the transformation network learns (a file; copied into the run)
    style_net: str = "random_vgg"  # the loss network (random_vgg, random_multiscale, vgg16:PATH, vgg19:PATH,
    #   vgg16-caffe:PATH, vgg19-caffe:PATH, or a classification run folder)
    style_size: NonNegInt = 0  # the style image's longer side in pixels (0: the training images' size)
    content_weight: NonNeg = 1.0  # weight of the content (feature reconstruction) loss
    style_weight: NonNeg = 5.0  # weight of the style (Gram) loss, each layer's normalized by its target
    tv_weight: NonNeg = 1.0  # weight of the total-variation loss (mean squared neighbour difference, 0..1)


class StyleTask(Task):
    name = "style"
    Options = StyleOptions
    Predictor = StylePredictor
    # the transformation network sees raw pixels (0..255) and must keep the content where it is: no flips or crops
    recipe = {"model.name": "transformnet", "data.normalize": "none", "data.augment": [], "optim.name": "adam",
              "optim.lr": 1e-3, "optim.weight_decay": 0.0, "schedule.name": "constant", "train.batch_size": 4,
              "train.epochs": 2, "eval.tta": "none", "loss.label_smoothing": 0.0, "model.channels_last": "off"}
    target = "image"
    primary = "loss"
    maximize = False
    stats = ("content", "style")
    raw_pixels = True  # the transformation network takes 0..255 (data.normalize=none)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self._loss: PerceptualLoss | None = None
        self.style_image: torch.Tensor | None = None

    # ---------------------------------------------------------------- data and model

    def check(self, ds: Dataset) -> None:
        t = self.options
        if not t.style:
            raise VisrecError("task style needs the style image: --style PATH (task.style)",
                              "for example: visrec train folder:PHOTOS --task style --style painting.jpg")
        if self.cfg.data.normalize != "none":
            raise VisrecError(f"task style takes raw pixels, and data.normalize={self.cfg.data.normalize}",
                              "leave data.normalize at the task's default (none)")
        size = t.style_size or max(ds.train.images.shape[-2:])
        self.style_image = read_style_image(t.style, ds.train.images.shape[1], size, self.cfg.data.max_pixels)

    def num_outputs(self, ds: Dataset) -> int:
        return ds.train.images.shape[1]

    def model_kwargs(self, ds: Dataset, model_name: str) -> dict[str, Any]:
        from ..models import is_file_model, model_entry

        if not is_file_model(model_name) and model_entry(model_name).family != "style":
            raise VisrecError(f"{model_name} is not an image transformation network", "use transformnet")
        return {}

    def check_model(self, model: nn.Module, ds: Dataset) -> None:
        if not getattr(model, "stylizer", False):
            raise VisrecError(f"{self.cfg.model.name} does not output images", "use transformnet")

    def perceptual(self, device: torch.device | str = "cpu") -> PerceptualLoss:
        """The loss (loss network and style targets), built once and moved to `device`."""
        if self._loss is None:
            t = self.options
            if self.style_image is None:
                self.style_image = read_style_image(t.style, 3, t.style_size or None, self.cfg.data.max_pixels)
            net = resolve_loss_net(t.style_net, self.style_image, trust=bool(self.cfg.model.trust_checkpoint))
            self._loss = PerceptualLoss(net, self.style_image, content_weight=t.content_weight,
                                        style_weight=t.style_weight, tv_weight=t.tv_weight)
        first = next(iter(self._loss.grams.values()))
        if first.device != torch.device(device):
            self._loss.to(device)
            self._loss.grams = {k: v.to(device) for k, v in self._loss.grams.items()}
        return self._loss

    def targets(self, data: ImageSet) -> torch.Tensor:
        return torch.zeros(len(data.images), dtype=torch.uint8)  # the target is the input image itself

    # ---------------------------------------------------------------- training

    def forward(self, model: nn.Module, x: torch.Tensor, targets: Any) -> dict[str, Any]:
        loss = self.perceptual(x.device)
        content = x.float() / 255.0
        y = model(x) / 255.0
        return {"losses": loss(y, content)}

    def loss(self, outputs: dict[str, Any], targets: Any) -> torch.Tensor:
        return outputs["losses"].total.mean()

    def batch_stats(self, outputs: dict[str, Any], targets: Any) -> torch.Tensor:
        part = outputs["losses"]
        return torch.stack([part.content.detach().sum(), part.style.detach().sum()])

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def stylize(self, model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """uint8 (N, C, H, W) content images -> uint8 stylized images."""
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        out = [model(chunk.to(device).float()).round().clamp(0, 255).byte().cpu()
               for chunk in images.split(batch_size)]
        model.train(was)
        return torch.cat(out) if out else images.clone()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> StyleEvaluation:
        device = next(model.parameters()).device
        loss = self.perceptual(device)
        was = model.training
        model.eval()
        sums = {"loss": 0.0, "content": 0.0, "style": 0.0, "tv": 0.0}
        for chunk in data.images.split(min(settings.batch_size, 32)):
            x = chunk.to(device).float()
            part = loss(model(x) / 255.0, x / 255.0)
            for k, v in (("loss", part.total), ("content", part.content), ("style", part.style), ("tv", part.tv)):
                sums[k] += float(v.sum())
        model.train(was)
        n = max(1, len(data.images))
        return StyleEvaluation(split, {k: v / n for k, v in sums.items()} | {"n": len(data.images)},
                               self.style_image)

    def summary_fields(self, test: Evaluation | None) -> dict[str, Any]:
        net = self._loss.net if self._loss is not None else None
        # a style network learns no classes: the one class of a folder of photos is not one
        return {"style_image": str(self.options.style), "loss_network": net.description if net else None,
                "num_classes": None}

    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 8,
                folder: Path | None = None) -> dict[str, bytes]:
        from ..plotting import figure_png, pyplot

        plt = pyplot()
        x = data.images[:n]
        y = self.stylize(model, x)
        fig, axes = plt.subplots(2, len(x) + 1, figsize=(1.8 * (len(x) + 1), 3.8), squeeze=False)
        style = self.style_image
        if style is None and folder is not None and (folder / "style.png").is_file():
            style = read_style_image(folder / "style.png", x.shape[1])
        for ax in axes[:, 0]:
            ax.axis("off")
        if style is not None:
            axes[0][0].imshow(style[0].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if style.shape[1] == 1
                              else None)
            axes[0][0].set_title("style", fontsize=8)
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            for row, img in ((0, a), (1, b)):
                ax = axes[row][i + 1]
                ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None,
                          vmin=0, vmax=255)
                ax.axis("off")
        return {"Test images (top) and their stylized versions (bottom)": figure_png(fig)}
