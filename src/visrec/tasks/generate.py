"""Image generation: a model learns the images' distribution (no labels) and samples new ones.

    visrec train fashion-mnist --task generate --model pixelcnn|gated_pixelcnn|row_lstm|vae|dcgan|wgan_gp|ddpm
    visrec sample RUN --n 64 [--seed S] [--steps N]      # a grid PNG and the samples as .npz
    visrec eval RUN --json                               # bits/dim or ELBO/NLL, FID and KID with their floor

The training objective is the model's own (`visrec.models.generative`). Evaluation reports what each kind can be
judged by, against the same split:

- likelihood models: `bpd`, bits per dimension (exact for the autoregressive models; the negative ELBO, an upper
  bound, for the VAE), and on the test split the VAE's importance-sampled NLL (`nll_bpd`, `nll_nats`; k =
  eval.importance_samples on the first eval.nll_images images);
- sample quality: FID and KID (torchmetrics, with features from a visrec classification run: eval.feature_run,
  by default a convnet trained once on the same dataset and cached; or `inception:PATH`, a torchvision Inception-v3
  weights file) between eval.samples samples and as many real images of the split; on the test split also the
  floor, the same distances between as many training and test images, and the share of each class among the
  samples under the feature run's classifier (`classes_present`, `top_class_share`).

The primary metric is `bpd` for likelihood models, `fid` for GANs, `loss` (the noise-prediction error) for DDPM.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..config import Range
from ..data import Dataset, ImageSet, Normalizer
from ..errors import VisrecError
from ..training.task import EvalSettings, Evaluation, Task

Say = Callable[[str], None]  # told, in a line, what a long step is doing

KIND_PRIMARY = {"autoregressive": "bpd", "vae": "bpd", "gan": "fid", "diffusion": "loss"}
KIND_STATS = {"autoregressive": ("bpd",), "vae": ("recon", "kl"), "gan": ("d_loss", "g_loss", "d_acc"),
              "diffusion": ()}


def model_kind(name: str) -> str:
    from ..models import is_file_model, model_entry

    if is_file_model(name):
        return "autoregressive"  # a user's model declares its own kind on the instance; checked in check_model
    entry = model_entry(name)
    if entry.family != "generative":
        raise VisrecError(f"{name} is not a generative model",
                          "use one of pixelcnn, gated_pixelcnn, row_lstm, vae, dcgan, wgan_gp, ddpm (visrec models "
                          "--family generative)")
    return {"pixelcnn": "autoregressive", "gated_pixelcnn": "autoregressive", "row_lstm": "autoregressive",
            "vae": "vae", "dcgan": "gan", "wgan_gp": "gan", "ddpm": "diffusion"}.get(name, "autoregressive")


# ------------------------------------------------------------------------------------------- features for FID


class FeatureNet(nn.Module):
    """uint8 images -> (N, d) features of a classification network (its pooled `forward_features`) and its class
    predictions; images of another size are resized (bilinear) to the network's, gray ones repeated to RGB for a
    color network. Color images for a gray network are refused."""

    def __init__(self, model: nn.Module, normalize, channels: int, size: tuple[int, int], description: str):
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.normalize, self.channels, self.size, self.description = normalize, channels, tuple(size), description
        self.note = ""
        with torch.no_grad():
            self.num_features = int(self._features(torch.zeros(1, channels, *self.size, dtype=torch.uint8)).shape[1])

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            if x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise VisrecError(f"the feature network ({self.description}) takes {self.channels}-channel images, "
                                  f"and the samples have {x.shape[1]}",
                                  "give eval.feature_run a run trained on images with the samples' channels")
        if tuple(x.shape[-2:]) != self.size:
            self.note = (f"images of {x.shape[-1]}x{x.shape[-2]} resized to the feature network's "
                         f"{self.size[1]}x{self.size[0]}")
            x = F.interpolate(x.float(), size=self.size, mode="bilinear", align_corners=False).round().clamp(0, 255)
        return x

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(self.normalize(self.adapt(x)))
        return f.flatten(2).mean(2) if f.dim() == 4 else f.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x).double()

    @torch.no_grad()
    def classes(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return torch.cat([self.model(self.normalize(self.adapt(c.to(dev)))).argmax(1).cpu()
                          for c in x.split(batch_size)])


def _inception(path: str) -> FeatureNet:
    import torchvision

    from ..io import load_weights

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    state = load_weights(path)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing and any(not k.startswith("AuxLogits") for k in missing):
        raise VisrecError(f"{path} does not hold torchvision Inception-v3 weights (missing {', '.join(missing[:3])})",
                          "give the file torchvision's inception_v3 loads (e.g. inception_v3_google-0cc3c7bd.pth)")
    net.fc = nn.Identity()
    net.AuxLogits = None
    net.aux_logits = False
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255

    class _Inc(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward_features(self, x):
            return self.net(x)

        def forward(self, x):
            return self.net(x)

    return FeatureNet(_Inc(), lambda x: (x.float() - mean.to(x.device)) / std.to(x.device), 3, (299, 299),
                      f"Inception-v3 from {path} (pool features, 2048)")


def has_default_feature_run(dataset: str) -> bool:
    """Whether `dataset` gets a cached default FID network: catalog datasets do; a user's folder does not (give
    eval.feature_run)."""
    return not (dataset.startswith(("folder:", "coco:", "yolo:"))
                or ":" in dataset and not dataset.startswith("synthetic"))


def cached_feature_run(folder: Path) -> str | None:
    """Why a cached default feature run cannot be used (None: it can): only a completed classification run with a
    test accuracy is ever cached, and an entry that is not one (from an older visrec, or damaged) is rebuilt."""
    import json

    try:
        s = json.loads((folder / "summary.json").read_text())
    except FileNotFoundError:
        return "not cached yet"
    except (OSError, ValueError) as e:
        return f"its summary.json is unreadable ({e})"
    if s.get("status") != "completed" or not isinstance(s.get("test_acc"), int | float):
        return f"its training did not complete (status {s.get('status')!r})"
    if not any((folder / "checkpoints").glob("*.safetensors")):
        return "it has no weights"
    return None


def default_feature_run(dataset: str, data_dir: str | None = None, say: Say | None = None) -> Path:
    """A convnet trained once (3 epochs) on `dataset` and cached under the user cache, for FID and class coverage.
    It trains in a temporary folder beside the cache and is moved into place only once it has completed; an entry
    that is not a completed run is rebuilt. `say` (a function of one string) is told what happens, and shown the
    training's progress."""
    import re
    import tempfile

    from ..io import user_cache_dir

    if not has_default_feature_run(dataset):
        raise VisrecError(f"no default feature network for {dataset}",
                          "give eval.feature_run=RUN: a classification run on images like these (visrec train DATA)")
    folder = user_cache_dir() / "feature_runs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
    why = cached_feature_run(folder)
    if why is None:
        return folder
    from ..data import load_dataset

    ds = load_dataset(dataset, data_dir=data_dir)
    if ds.num_classes < 2:
        raise VisrecError(f"{dataset} has no classes to train the default feature network on",
                          "give eval.feature_run=RUN (a classification run) or eval.feature_run=none")
    from ..config import resolve_config
    from ..training.loop import Trainer
    from .classification import ClassificationTask

    cfg = resolve_config(None, {"data.name": dataset, "model.name": "convnet", "train.epochs": 3,
                                "data.data_dir": data_dir, "log.report": False})
    if say is not None:
        rebuilt = "" if why == "not cached yet" else f" (the cached one is rebuilt: {why})"
        # about 8 s per 10,000 images and epoch for this convnet on a 2-core CPU (bench/default_job.txt)
        minutes = max(1, round(3 * len(ds.train) * 8e-4 / 60))
        say(f"training the feature network for FID once: a convnet, 3 epochs on {len(ds.train):,} images of "
            f"{dataset}, about {minutes} min on a CPU{rebuilt}; cached in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # gradients on, as this may be called from an evaluation
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as tmp, torch.enable_grad():
        run = Trainer(cfg, ClassificationTask(cfg), out=Path(tmp) / "run", dataset=ds, progress=False,
                      quiet=say is None).fit()
        if run.status != "completed":
            raise VisrecError(f"training the default FID feature network for {dataset} was {run.status} "
                              f"({run.summary.get('error', 'no reason recorded')}); nothing was cached",
                              "run the command again to train it, or give eval.feature_run=RUN")
        if cached_feature_run(folder) is not None:  # another process may have finished one meanwhile
            if folder.exists():
                stale = Path(tmp) / "stale"
                folder.rename(stale)  # out of the way in one step, removed with the temporary folder
            (Path(tmp) / "run").rename(folder)
    return folder


def feature_net(spec: str, dataset: str, data_dir: str | None = None, say: Say | None = None
                ) -> FeatureNet | None:
    """The FID feature network of `eval.feature_run`: none, inception:PATH, a run folder, or '' for the default."""
    if spec == "none":
        return None
    if spec.startswith("inception:"):
        return _inception(spec.split(":", 1)[1])
    from ..run_store import RunFolder as Run

    path = Path(spec) if spec else default_feature_run(dataset, data_dir, say)
    run = Run(path)
    if run.config.task.name != "classification":
        raise VisrecError(f"eval.feature_run={spec}: {path} is a {run.config.task.name} run",
                          "give a classification run")
    lm = run.load_model(device="cpu")
    if lm.normalizer.mode not in ("channel", "none", "image"):
        raise VisrecError(f"eval.feature_run={path} whitens its inputs ({lm.normalizer.mode})",
                          "give a run trained with data.normalize=channel")
    return FeatureNet(lm.model, lm.normalizer, lm.in_chans, lm.image_size,
                      f"the run {path} ({run.config.model.name}, test accuracy "
                      f"{run.summary.get('test_acc', float('nan')):.4f})")


@torch.no_grad()
def fid_kid(fnet: FeatureNet, a: torch.Tensor, b: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """FID and KID (mean and std over subsets) between two uint8 image sets, with torchmetrics on `fnet`'s
    features."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(a), len(b))
    fid = FrechetInceptionDistance(feature=fnet, reset_real_features=True, normalize=False)
    with warnings.catch_warnings():  # that KID keeps every feature in memory: a few MB for the counts used here
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=fnet, subsets=10, subset_size=max(2, min(1000, n // 2)),
                                      normalize=False)
    for x, real in ((a, True), (b, False)):
        for chunk in x.split(batch_size):
            fid.update(chunk, real=real)
            kid.update(chunk, real=real)
    k_mean, k_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(k_mean), "kid_std": float(k_std)}


# ------------------------------------------------------------------------------------------- the task


def grid_png(images: torch.Tensor, cols: int = 8, title: str = "") -> bytes:
    """uint8 (N, C, H, W) as one PNG grid (2-pixel gaps)."""
    from ..plotting import figure_png, pyplot

    plt = pyplot()
    n = len(images)
    rows = max(1, math.ceil(n / cols))
    c, h, w = images.shape[1:]
    canvas = torch.full((c, rows * (h + 2), cols * (w + 2)), 255, dtype=torch.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        canvas[:, r * (h + 2): r * (h + 2) + h, q * (w + 2): q * (w + 2) + w] = im
    fig, ax = plt.subplots(figsize=(cols * 0.6 + 0.4, rows * 0.6 + (0.5 if title else 0.2)))
    ax.imshow(canvas.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=255)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    return figure_png(fig)


class GenerateEvaluation(Evaluation):
    def __init__(self, split: str, metrics: dict[str, float], grids: list[tuple[str, torch.Tensor]],
                 samples: torch.Tensor | None):
        super().__init__(split, metrics)
        self.grids, self.samples = grids, samples

    def save(self, folder: Path) -> None:
        from ..io import write_bytes

        for name, images in self.grids:
            write_bytes(folder / "samples" / f"{name}.png", grid_png(images[:64], title=name.replace("_", " ")))
        if self.samples is not None:
            write_bytes(folder / "samples.npz", npz_bytes(self.samples))


def npz_bytes(images: torch.Tensor, **extra) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, images=images.numpy(), **extra)
    return buf.getvalue()


def sample_run(run, n: int = 64, *, seed: int = 0, steps: int | None = None, out: str | Path | None = None,
               which: str = "auto", device: str = "cpu") -> tuple[Path, Path, float]:
    """Draw `n` samples from a generate run: a grid PNG at `out` (default RUN/samples/sample-seedS.png) and the
    uint8 images (N, C, H, W) in a .npz beside it. Returns both paths and the seconds sampling took."""
    import time

    from ..io import write_bytes
    from ..run_store import RunFolder as Run

    run = run if isinstance(run, Run) else Run(run)
    if run.config.task.name != "generate":
        raise VisrecError(f"{run.path} is a {run.config.task.name} run: visrec sample draws from generate runs",
                          "train one with: visrec train fashion-mnist --task generate --model dcgan (or pixelcnn, "
                          "vae, wgan_gp, ddpm)")
    if n < 1:
        raise VisrecError(f"--n {n}: nothing to draw", "give --n 1 or more, e.g. --n 64")
    lm = run.load_model(which, device=device)
    if steps is not None and getattr(lm.model, "kind", "") != "diffusion":
        raise VisrecError(f"--steps is for diffusion runs, and {run.path} is a {run.config.model.name} run",
                          "leave out --steps")
    started = time.perf_counter()
    images = lm.model.sample(n, generator=torch.Generator().manual_seed(seed), steps=steps)
    seconds = time.perf_counter() - started
    png = Path(out) if out is not None else run.path / "samples" / f"sample-seed{seed}.png"
    if png.suffix.lower() != ".png":
        raise VisrecError(f"--out {png} must end in .png", "name the grid file.png")
    write_bytes(png, grid_png(images, cols=min(8, n) if n < 64 else int(math.ceil(math.sqrt(n)))))
    npz = png.with_suffix(".npz")
    write_bytes(npz, npz_bytes(images, seed=seed, seconds=seconds))
    return png, npz, seconds


@dataclass
class GenerateOptions:
    # GANs: joint = one optimizer, one step for both networks (the generator's loss through a gradient-free copy of
    #   the critic); alternating = a critic step, then a generator step through the updated critic, each network
    #   with its own optimizer
    gan_update: Literal["joint", "alternating"] = "joint"
    # gan_update=alternating: the critic's learning rate is optim.lr times this (the two time-scale update rule,
    #   Heusel et al. 2017: a faster critic, e.g. 4)
    critic_lr_scale: Annotated[float, Range(0, open_low=True)] = 1.0


class GenerateTask(Task):
    name = "generate"
    Options = GenerateOptions
    # raw pixels (the models scale them), no flips (a flipped garment is another image to a likelihood), Adam
    recipe = {"model.name": "pixelcnn", "data.normalize": "none", "data.augment": [], "optim.name": "adam",
              "optim.lr": 1e-3, "optim.weight_decay": 0.0, "schedule.name": "cosine", "train.batch_size": 64,
              "train.epochs": 10, "eval.tta": "none", "loss.label_smoothing": 0.0, "model.channels_last": "off",
              "optim.grad_clip": 1.0}
    # GANs: Adam with beta1 0.5 (Radford et al.) or 0 (WGAN-GP, Gulrajani et al.), no clipping (the penalty is the
    # critic's constraint); DDPM: Ho et al.'s 2e-4 without decay
    model_recipes = {
        "dcgan": {"optim.lr": 2e-4, "optim.betas": [0.5, 0.999], "optim.grad_clip": 0.0, "schedule.name": "constant"},
        "wgan_gp": {"optim.lr": 1e-4, "optim.betas": [0.0, 0.9], "optim.grad_clip": 0.0, "schedule.name": "constant"},
        "ddpm": {"optim.lr": 2e-4, "optim.grad_clip": 1.0, "schedule.name": "constant"},
    }
    predict_hint = ("it makes new images: draw samples with visrec sample {run} --n 64 (in Python: "
                    "visrec.tasks.generate.sample_run)")
    target = "image"
    primary = "bpd"
    maximize = False
    stats = ()
    raw_pixels = True  # the models take 0..255 and scale them themselves (data.normalize=none)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        try:
            self._set_kind(model_kind(self.cfg.model.name))
        except VisrecError:  # not a generative model: model_kwargs says so when a run is built
            self._set_kind("autoregressive")
        self._fnet: FeatureNet | None | bool = False  # False: not built yet
        self.grids: list[tuple[str, torch.Tensor]] = []
        self._evals = 0

    def check(self, ds: Dataset) -> None:
        cfg = self.cfg
        self._train_images = ds.train.images  # the floor of FID and the memorization check compare with them
        if cfg.data.normalize != "none":
            raise VisrecError(f"task generate models raw pixels, and data.normalize={cfg.data.normalize}",
                              "leave data.normalize at the task's default (none)")
        if self.kind == "gan":
            if cfg.average.swa:
                raise VisrecError("average.swa on a GAN: SWA recomputes batch norm over training images, which "
                                  "a generator never sees", "leave average.swa=0; for a smoother generator use "
                                  "average.ema=0.999")
            if cfg.average.ema and cfg.average.ema < 0.99:
                raise VisrecError(f"average.ema={cfg.average.ema} on a GAN averages only the last "
                                  f"~{1 / (1 - cfg.average.ema):.0f} steps: the generator's oscillation, not a "
                                  "better generator", "use average.ema=0.999 (0.99 at least), or leave it off")
            if cfg.eval.feature_run == "none":
                raise VisrecError("a GAN has no likelihood: it is judged by FID, which needs a feature network, and "
                                  "eval.feature_run=none", "leave eval.feature_run empty (a cached default), or give "
                                  "a classification run")
        if self.kind != "autoregressive" and not cfg.eval.feature_run and not has_default_feature_run(cfg.data.name):
            # said before training: the first evaluation would find it out after an epoch
            skip = "" if self.kind == "gan" else ", or eval.feature_run=none to leave FID out"
            raise VisrecError(f"FID needs a feature network, and {cfg.data.name} has no default one (catalog datasets "
                              "get a cached convnet)", "give eval.feature_run=RUN, a classification run on images like "
                              f"these (visrec train {cfg.data.name} first), or inception:PATH{skip}")

    def num_outputs(self, ds: Dataset) -> int:
        return ds.train.images.shape[1]

    def model_kwargs(self, ds: Dataset, model_name: str) -> dict[str, Any]:
        self._set_kind(model_kind(model_name))
        return {}

    def _set_kind(self, kind: str) -> None:
        """The model's kind decides the primary metric, the training statistics and whether the loss must fall."""
        self.kind, self.primary, self.stats = kind, KIND_PRIMARY[kind], KIND_STATS[kind]
        self.loss_falls = kind != "gan"

    def check_model(self, model: nn.Module, ds: Dataset) -> None:
        if not getattr(model, "generative", False):
            raise VisrecError(f"{self.cfg.model.name} is not a generative model",
                              "use one of pixelcnn, gated_pixelcnn, row_lstm, vae, dcgan, wgan_gp, ddpm")

    def targets(self, data: ImageSet) -> torch.Tensor:
        return torch.zeros(len(data.images), dtype=torch.uint8)  # the image is its own target

    def _alternating(self) -> bool:
        return self.kind == "gan" and self.options.gan_update == "alternating"

    def optimizers(self, model: nn.Module, build) -> dict[str, torch.optim.Optimizer] | None:
        """A GAN trained alternately: the critic's optimizer (optim.lr x task.critic_lr_scale, the two time-scale
        update rule) and the generator's (optim.lr)."""
        if not self._alternating():
            return None
        return {"critic": build(model.critic, self.options.critic_lr_scale), "generator": build(model.generator, 1.0)}

    def train_step(self, xb: torch.Tensor, yb: Any, ctx) -> tuple[Any, torch.Tensor, Any, bool]:
        """Alternating GAN updates: the critic on this batch and fresh samples, then (every n_critic-th step) the
        generator on the same samples through the critic just updated. The step's loss is the sum of the two, as a
        joint step's is."""
        if not self._alternating():
            return super().train_step(xb, yb, ctx)
        x, target = ctx.inputs(xb, yb)
        model = ctx.model
        g_step = int(model.steps) % model.n_critic == 0
        # one batch of samples for both steps (kept on the generator's graph), except across processes, where DDP
        # must see the generator run in the forward whose backward reaches it
        reuse = g_step and not isinstance(ctx.net, torch.nn.parallel.DistributedDataParallel)
        with ctx.autocast():
            d = ctx.net(x, "critic+samples" if reuse else "critic")
        stepped = ctx.update(d["loss"], "critic")
        g_loss = torch.zeros((), device=x.device)
        if g_step:
            with ctx.autocast():
                g = ctx.net(d["fake"], "generator:samples") if reuse else ctx.net(x, "generator")
            stepped = ctx.update(g["loss"], "generator") and stepped
            g_loss = g["loss"].detach()
        model.steps += 1
        loss = d["loss"].detach() + g_loss
        out = {"loss": loss, "d_loss": d["d_loss"], "g_loss": g_loss * torch.ones_like(d["d_loss"]),
               "d_acc": d["d_acc"]}
        return out, loss, target, stepped

    def forward(self, model: nn.Module, x: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        return model(x)

    def loss(self, outputs: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        return outputs["loss"]

    def batch_stats(self, outputs: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        if not self.stats:
            return outputs["loss"].new_zeros(0)
        return torch.stack([outputs[k].float().sum() for k in self.stats])

    # ------------------------------------------------------------------ evaluation

    def features(self, say: Say | None = None) -> FeatureNet | None:
        if self._fnet is False:
            self._fnet = feature_net(self.cfg.eval.feature_run, self.cfg.data.name, self.cfg.data.data_dir, say)
        return self._fnet

    def sample(self, model: nn.Module, n: int, seed: int = 0, steps: int | None = None) -> torch.Tensor:
        core = model.module if hasattr(model, "module") else model
        was = core.training
        core.eval()
        try:
            return core.sample(n, generator=torch.Generator().manual_seed(seed), steps=steps)
        finally:
            core.train(was)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> GenerateEvaluation:
        core = model.module if hasattr(model, "module") else model
        was = core.training
        core.eval()
        dev = core.device
        m: dict[str, float] = {"n": len(data.images)}
        bs = min(settings.batch_size, 256)
        g = torch.Generator().manual_seed(0)  # the same binarization, noise and times at every evaluation
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            if core.likelihood:
                bpd = [core.bits_per_dim(c.to(dev).float(), **({"generator": g} if self.kind == "vae" else {}))
                       for c in data.images.split(bs)]
                m["bpd"] = float(torch.cat(bpd).mean())
                m["loss"] = m["bpd"]
                if self.kind == "vae":
                    m["elbo_nats"] = -m["bpd"] * data.images[0].numel() * math.log(2)
                    if split == "test":
                        m.update(self._importance(core, data, g, settings))
            elif self.kind == "diffusion":
                m["loss"] = float(torch.cat([core(c.to(dev).float())["loss"].view(1) * len(c)
                                             for c in data.images.split(bs)]).sum()) / len(data.images)
            if self.kind == "gan":
                m["d_acc"] = core.critic_accuracy(data.images[:min(1000, len(data.images))].to(dev), g)
        finally:
            torch.random.set_rng_state(torch_state)
        self._evals += 1
        grids: list[tuple[str, torch.Tensor]] = []
        sampled = None
        if split == "test" or self.kind != "autoregressive":
            # autoregressive sampling costs H·W·C network passes: 16 at the end, for the report, and no FID
            steps = self.cfg.eval.sample_steps or None if self.kind == "diffusion" else None
            n = min(self.cfg.eval.samples, len(data.images))
            fnet = self.features(settings.say) if self.kind != "autoregressive" else None
            sampled = self.sample(core, n if fnet is not None else 16 if self.kind == "autoregressive" else 64,
                                  seed=0, steps=steps)
            name = "test" if split == "test" else f"epoch_{self._evals:03d}"
            self.grids.append((name, sampled[:64]))
            grids = list(self.grids) if split == "test" else []
            if fnet is not None and (split == "test" or self._evals % self.cfg.eval.fid_every == 0):
                m.update(self._sample_metrics(fnet, sampled, data, split))
        core.train(was)
        return GenerateEvaluation(split, m, grids, sampled)

    def _importance(self, core, data: ImageSet, g: torch.Generator, settings: EvalSettings) -> dict[str, float]:
        k, n = self.cfg.eval.importance_samples, min(self.cfg.eval.nll_images, len(data.images))
        x = data.images[:n].float().to(core.device)
        target = core.prepare(x, g)
        chunks, nll, t0 = target.split(32), [], time.perf_counter()
        for i, c in enumerate(chunks, 1):
            nll.append(core.importance_nll(c, k=k))
            if i == 1 or i == len(chunks) or i % max(1, len(chunks) // 4) == 0:  # about four lines in all
                left = (time.perf_counter() - t0) / i * (len(chunks) - i)
                settings.note(f"  importance-sampled NLL (eval.importance_samples={k}): {min(i * 32, n):,}/{n:,} "
                              f"test images" + (f", about {left:.0f} s left" if i < len(chunks) else ""))
        nll = torch.cat(nll)
        d = data.images[0].numel() * math.log(2)
        return {"nll_nats": float(nll.mean()), "nll_bpd": float(nll.mean()) / d, "nll_images": n,
                "importance_samples": k}

    def _sample_metrics(self, fnet: FeatureNet, sampled: torch.Tensor, data: ImageSet, split: str
                        ) -> dict[str, float]:
        n = len(sampled)
        real = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(1))[:n]]
        out: dict[str, Any] = {**fid_kid(fnet, real, sampled), "samples": n}
        preds = fnet.classes(sampled)
        counts = torch.bincount(preds, minlength=max(1, len(data.classes)))
        out["classes_present"] = int((counts > 0).sum())
        out["top_class_share"] = float(counts.max()) / n
        if split == "test" and self._train_images is not None:
            train = self._train_images
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(2))[:n]
            floor = fid_kid(fnet, real, train[pick])
            out["fid_floor"], out["kid_floor"] = floor["fid"], floor["kid"]
        if fnet.note:
            out["feature_note"] = fnet.note
        return out

    _train_images: torch.Tensor | None = None

    def summary_fields(self, test: Evaluation | None) -> dict[str, Any]:
        fnet = self._fnet if self._fnet is not False else None
        return {"generative_kind": self.kind, "feature_network": fnet.description if fnet else None}

    def at_chance(self, test: Evaluation, ds: Dataset) -> str | None:
        """The GAN's health in plain words: mode collapse, or a discriminator that wins outright."""
        notes = []
        share = test.metrics.get("top_class_share")
        if share is not None and share > 0.5:
            notes.append(f"mode collapse: {share:.0%} of the samples fall in one class (classes present: "
                         f"{test.metrics.get('classes_present')}); try wgan_gp, a lower learning rate, or "
                         "average.ema=0.999")
        acc = test.metrics.get("d_acc")
        if self.kind == "gan" and acc is not None and acc > 0.95:
            notes.append(f"the discriminator overpowers the generator: it tells {acc:.0%} of real and generated "
                         "images apart, so the generator's gradient carries little; lower its learning rate or "
                         "width, or use wgan_gp (its critic is meant to win without starving the generator)")
        return "; ".join(notes) or None

    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 8,
                folder: Path | None = None) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if folder is not None and (folder / "samples").is_dir():
            for p in sorted((folder / "samples").glob("*.png")):
                out[f"Samples: {p.stem.replace('_', ' ')}"] = p.read_bytes()
        core = model.module if hasattr(model, "module") else model
        if self.kind != "autoregressive":
            samples = self.sample(core, 8, seed=0, steps=(self.cfg.eval.sample_steps or None)
                                  if self.kind == "diffusion" else None)
        elif folder is not None and (folder / "samples.npz").is_file():
            import numpy as np

            samples = torch.from_numpy(np.load(folder / "samples.npz")["images"][:8])
        else:
            samples = None
        if samples is not None:
            out["Memorization: each sample (top) and its nearest training image in pixels (bottom)"] = \
                memorization_png(samples, data.images if self._train_images is None else self._train_images)
        if self.kind == "vae":
            out.update(vae_figures(core, data))
        return out


def nearest(samples: torch.Tensor, train: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the index of the nearest training image (L2 over pixels) and the distance."""
    s = samples.flatten(1).float()
    best_d = torch.full((len(s),), float("inf"))
    best_i = torch.zeros(len(s), dtype=torch.long)
    for start in range(0, len(train), chunk):
        t = train[start:start + chunk].flatten(1).float()
        d = torch.cdist(s, t)
        v, i = d.min(1)
        better = v < best_d
        best_d[better], best_i[better] = v[better], i[better] + start
    return best_i, best_d


def memorization_png(samples: torch.Tensor, train: torch.Tensor) -> bytes:
    idx, _ = nearest(samples, train)
    return grid_png(torch.cat([samples, train[idx]]), cols=len(samples))


@torch.no_grad()
def vae_figures(core, data: ImageSet) -> dict[str, bytes]:
    """Latent interpolation between pairs of test images, and the 2-D manifold (the first two latent dimensions
    on a grid of Gaussian quantiles, the others 0)."""
    x = data.images[:8].float().to(core.device)
    mu, _ = core.encode(core.prepare(x, torch.Generator().manual_seed(0)))
    rows = []
    for a, b in ((0, 1), (2, 3), (4, 5)):
        t = torch.linspace(0, 1, 10, device=mu.device)[:, None]
        rows.append(core.images(core.decode((1 - t) * mu[a] + t * mu[b])).cpu())
    out = {"VAE: latent interpolation between test images": grid_png(torch.cat(rows), cols=10)}
    q = torch.distributions.Normal(0, 1).icdf(torch.linspace(0.05, 0.95, 12))
    z = torch.zeros(144, core.latent, device=mu.device)
    z[:, 0] = q.repeat_interleave(12).to(mu.device)
    if core.latent > 1:
        z[:, 1] = q.repeat(12).to(mu.device)
    title = "VAE: the 2-D latent manifold" + ("" if core.latent == 2 else
                                               f" (dimensions 1 and 2 of {core.latent}, the rest 0)")
    out[title] = grid_png(core.images(core.decode(z)).cpu(), cols=12)
    return out
