"""Building what a run trains: config checks, the model (with its data-dependent layers fitted) and the weights it
starts from. Training and the doctor build their models here, so both see the same network."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..config import Config, validate
from ..data import Dataset, Normalizer
from ..distributed import Dist, env_world, init_distributed
from ..errors import VisrecError
from ..evaluate import resolve_crop_pad
from ..io import load_weights
from ..models import create_model, is_file_model
from ..models.init import init_weights, parse_init
from ..models.layers import PatchWhitening
from ..models.reference import engine_model
from ..run_store import RunRef
from .finetune import check_finetune


def check_config(cfg: Config) -> None:
    """Every value against its type, choices and range (see `visrec.config`), then the combinations of keys."""
    validate(cfg)
    t = cfg.train
    resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment)
    if t.select == "best" and cfg.data.val_fraction == 0:
        raise VisrecError("train.select=best needs a validation split", "set data.val_fraction > 0 or select=last")
    if cfg.average.swa > 0 and t.select == "best":
        raise VisrecError("average.swa averages the final part of training; it does not combine with "
                          "train.select=best", "use train.select=last with SWA")
    if cfg.distill.teachers and cfg.loss.name != "cross_entropy":
        raise VisrecError(f"distillation learns from probabilities: it needs loss.name=cross_entropy, not "
                          f"{cfg.loss.name!r}")
    check_finetune(cfg.finetune, bool(cfg.model.weights) or cfg.model.pretrained)
    for key, top in (("crop_scale", 1.0), ("crop_ratio", float("inf"))):
        pair = list(getattr(cfg.data, key))
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= top:
            raise VisrecError(f"data.{key}={pair} is not a range (low, high) within (0, {top:g}]",
                              "give two numbers, low then high, e.g. data.crop_scale=[0.08,1] or "
                              "data.crop_ratio=[0.75,1.3333]")
    if t.engine == "numpy":
        check_numpy_engine(cfg)
    if cfg.finetune.strategy == "two_stage" and cfg.finetune.head_epochs >= t.epochs:
        raise VisrecError(f"finetune.head_epochs={cfg.finetune.head_epochs} leaves no epoch of the {t.epochs} "
                          "to train everything", "train more epochs or fewer head epochs")
    if cfg.distill.teachers and cfg.finetune.strategy == "linear":
        raise VisrecError("distillation needs the student's images, but finetune.strategy=linear trains on cached "
                          "features", "use finetune.strategy=last or full with distill.teachers")


def check_numpy_engine(cfg: Config) -> None:
    """train.engine=numpy runs visrec.ref on the CPU in fp32: refuse what it cannot do, naming the key."""
    engine_model(cfg.model.name, cfg.model.kwargs, "numpy")  # a model it implements
    from .optim import REF_RULES

    bad = []
    if cfg.device.name not in ("auto", "cpu"):
        bad.append(f"device.name={cfg.device.name} (it runs on the CPU: --device cpu)")
    if cfg.device.precision not in ("auto", "fp32"):
        bad.append(f"device.precision={cfg.device.precision} (it computes in fp32)")
    if cfg.model.compile:
        bad.append("model.compile=true (torch.compile cannot trace NumPy)")
    if cfg.optim.name not in REF_RULES:
        bad.append(f"optim.name={cfg.optim.name} (its update rules: {', '.join(REF_RULES)})")
    if cfg.model.pretrained or cfg.finetune.strategy != "none":
        bad.append("pretrained weights or a fine-tune strategy")
    if bad:
        raise VisrecError("train.engine=numpy cannot use " + "; ".join(bad), "change those keys, or use "
                          "train.engine=torch")


@contextlib.contextmanager
def engine_threads(cfg: Config):
    """train.engine=numpy computes in NumPy's BLAS; torch's own threads, idle-spinning beside it on the same cores,
    made steps 25x slower on 2 cores. Unless device.threads is set, torch keeps one thread while the NumPy engine
    trains (restored after)."""
    if cfg.train.engine != "numpy" or cfg.device.threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start_distributed(cfg: Config) -> Dist:
    """Join the process group when torchrun started this process (WORLD_SIZE > 1), after refusing what does not
    run across processes; a plain Dist otherwise."""
    if env_world() <= 1:
        return Dist()
    bad = []
    if cfg.finetune.strategy not in ("none", "full"):
        bad.append(f"finetune.strategy={cfg.finetune.strategy} (it changes which parameters train, which "
                   "DistributedDataParallel fixes when it wraps the model)")
    if cfg.optim.name == "lbfgs":
        bad.append("optim.name=lbfgs (a full-batch method: one process holds the batch)")
    if cfg.train.engine == "numpy":
        bad.append("train.engine=numpy")
    wants_cuda = cfg.device.name.startswith("cuda") or (cfg.device.name == "auto" and torch.cuda.is_available())
    if cfg.train.sync_bn and not wants_cuda:
        bad.append("train.sync_bn=true on the CPU (PyTorch's SyncBatchNorm runs only on CUDA; on the CPU each "
                   "process normalizes with its own share of the batch and rank 0's running statistics are "
                   "broadcast at every step)")
    if bad:
        raise VisrecError("training across processes cannot use " + "; ".join(bad),
                          "change those keys, or train in one process")
    return init_distributed(cfg.train.dist_backend, "cuda" if wants_cuda else "cpu", cfg.train.dist_timeout)


def rank_device(d: Dist, device: torch.device, threads: int) -> torch.device:
    """Each process's device: its own GPU (cuda:LOCAL_RANK), or the CPU with the cores shared among the processes
    of the node (torchrun leaves one thread each)."""
    if device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    n = threads or max(1, len(os.sched_getaffinity(0)) // d.local_world)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return device


def wrap_ddp(model: nn.Module, cfg: Config, device: torch.device, *, find_unused: bool) -> nn.Module:
    """The model in DistributedDataParallel (gradients averaged over the processes; rank 0's buffers broadcast),
    with SyncBatchNorm first when train.sync_bn is on (CUDA)."""
    from torch.nn.parallel import DistributedDataParallel

    if cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


MIN_BATCH = 16


def epoch_batch_size(batch_size: int, n_train: int, min_epoch_steps: int) -> int:
    """The batch a run trains with: `train.batch_size`, halved (not below 16) while an epoch of `n_train` images
    would have fewer than `min_epoch_steps` optimizer steps. A whole schedule of a handful of steps learns
    nothing (256-image batches on 1,300 digits are 5 steps an epoch); smaller batches give it steps."""
    bs = max(1, min(batch_size, n_train))
    while min_epoch_steps and bs > MIN_BATCH and n_train // bs < min_epoch_steps:
        bs = max(MIN_BATCH, bs // 2)
    return bs


def schedule_warnings(total_steps: int, epochs: int, steps_per_epoch: int, batch_size: int, n_train: int) -> list[str]:
    """What to tell the user before training when the schedule is too short to learn from."""
    if total_steps >= 50:
        return []
    want = max(MIN_BATCH, n_train // 25)
    fix = (f"train longer (--epochs {math.ceil(100 / max(steps_per_epoch, 1))} gives about 100 steps)"
           if batch_size <= want else f"use --batch-size {2 ** int(math.log2(want))} or more epochs")
    return [f"the whole schedule is {total_steps} optimizer step(s) ({epochs} epoch(s) of {steps_per_epoch} "
            f"batch(es) of {batch_size} on {n_train} images): too few to learn much. {fix[0].upper()}{fix[1:]}."]


NORMALIZER_SAMPLE = 512  # streamed training sets: a seeded sample whose statistics fit the normalization


def fit_normalizer(cfg: Config, ds: Dataset) -> Normalizer:
    """The input normalization of `cfg.data`, fitted on the training split (on the CPU)."""
    d = cfg.data
    if d.normalize in ("pca", "pca_whiten") and d.augment:
        raise VisrecError(f"data.normalize={d.normalize} turns each image into {d.pca_k or 'k'} features, which "
                          f"augmentation ({', '.join(d.augment)}) cannot work on",
                          "--set data.augment=[], or use data.normalize=zca, which keeps the image layout")
    images = ds.train.images
    if ds.train.streamed:  # images in their files: the statistics of a seeded sample, not a pass over them all
        if d.normalize in ("pca", "pca_whiten", "zca"):
            raise VisrecError(f"data.normalize={d.normalize} needs the whole training set in memory, and this one "
                              "streams from its files (data.cache=none)",
                              "use data.normalize=channel, or data.cache=disk to decode the images once")
        images = images.sample(NORMALIZER_SAMPLE, seed=cfg.data.split_seed)
    return Normalizer.fit(images, d.normalize, k=d.pca_k, eps=d.pca_eps)


def model_spec(cfg: Config, ds: Dataset, normalizer: Normalizer, num_outputs: int) -> dict[str, Any]:
    """What a checkpoint records to rebuild its network: the name and kwargs, the pixel input (channels, size) and,
    when the preprocessing changes the shape (pca), the shape the network takes."""
    name, kwargs = engine_model(cfg.model.name, cfg.model.kwargs, cfg.train.engine)  # the network as built
    spec = {"name": name, "kwargs": kwargs, "in_chans": ds.channels, "num_classes": num_outputs,
            "image_size": list(ds.image_size)}
    net = normalizer.output_shape((ds.channels, *ds.image_size))
    if list(net) != [ds.channels, *ds.image_size]:
        spec["net_input"] = list(net)
    return spec


def build_model(cfg: Config, ds: Dataset, normalizer: Normalizer, num_outputs: int, *, seed: int | None = None,
                load_weights_from_config: bool = True) -> tuple[nn.Module, Normalizer, str | None]:
    """The network of `cfg` for `ds`, as training builds it: created by name, its data-dependent layers (a
    whitening first layer) fitted on the normalized training images, then the initial weights of `model.weights`
    loaded over it. Returns (model on the CPU, the normalizer its inputs need, a note on the loaded weights).

    A run's weights bring that run's preprocessing: the returned normalizer is then the source run's."""
    if is_file_model(cfg.model.name):
        # The run must find the file again from any working directory.
        path, fn = cfg.model.name.rsplit(":", 1)
        cfg.model.name = f"{Path(path).expanduser().resolve()}:{fn}"
    c, h, w = normalizer.output_shape((ds.channels, *ds.image_size))
    name, kwargs = engine_model(cfg.model.name, cfg.model.kwargs, cfg.train.engine)
    try:
        model = create_model(name, in_chans=c, num_classes=num_outputs, image_size=(h, w),
                             pretrained=cfg.model.pretrained, **kwargs)
    except VisrecError as e:
        if normalizer.mode in ("pca", "pca_whiten"):
            raise VisrecError(f"model {cfg.model.name} cannot take the {c} features of data.normalize="
                              f"{normalizer.mode}: {e.message}", "use model linear or mlp, or data.normalize=zca "
                              "(which keeps the image layout)") from None
        raise
    seed = cfg.train.seed if seed is None else seed
    scheme, _ = parse_init(cfg.model.init)
    if scheme != "default":
        if cfg.model.pretrained:
            raise VisrecError(f"model.init={cfg.model.init} would overwrite the pretrained weights of {cfg.model.name}",
                              "leave model.init at default, or set model.pretrained=false")
        sample = None
        if scheme == "lsuv":  # a seeded batch of normalized training images
            idx = torch.randperm(len(ds.train.images), generator=torch.Generator().manual_seed(seed))[:256]
            sample = normalizer(ds.train.images[idx].to(normalizer.device)).cpu()
        init_weights(model, cfg.model.init, sample)
    fit_data_dependent(model, ds.train.images, normalizer, seed)
    note = None
    if cfg.model.weights and load_weights_from_config:
        note, source_norm = load_initial_weights(model, cfg.model.weights, cfg.model.trust_checkpoint,
                                                 new_head=cfg.finetune.strategy != "none")
        if source_norm is not None:  # a run's network sees its inputs preprocessed as in its own training
            normalizer = source_norm.to(normalizer.device)
    return model, normalizer, note


def fit_data_dependent(model: nn.Module, images: torch.Tensor, normalizer: Normalizer, seed: int,
                       n: int = 10_000) -> None:
    """Fit the layers set from the data rather than trained (a whitening first layer) on a seeded sample of the
    normalized training images. Loaded weights or a resumed checkpoint replace what this sets."""
    layers = [m for m in model.modules() if isinstance(m, PatchWhitening)]  # each must be the first layer
    if not layers:
        return
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    x = normalizer(images[idx].to(normalizer.device))
    for m in layers:
        m.fit(x.to(m.weight.device))


def load_initial_weights(model: nn.Module, path: str, trust: bool, *, new_head: bool = False
                         ) -> tuple[str, Normalizer | None]:
    """Load a weight file, or the weights of a run folder (`RUN`, `RUN:best`, `RUN:last`), into a fresh model by
    name. A classifier head whose shape differs (another number of classes), or any head with `new_head`, keeps its
    fresh initialization; any other missing, unexpected or mis-shaped tensor is an error.

    Returns a note for the user and, for a run, its preprocessing state (the network expects inputs prepared so)."""
    norm = None
    ref = RunRef.parse(path)
    if ref.path.is_dir():
        run = ref.run
        ckpt = load_checkpoint(run.path / "checkpoints", run.checkpoint_tag(ref.which))
        weights = dict(ckpt.swa or ckpt.ema or ckpt.weights)
        norm = Normalizer.from_state(ckpt.meta["preprocess"], ckpt.extra.get("preprocess"))
    else:
        weights = load_weights(path, trust=trust)
    own = model.state_dict()
    head = model.head_path + "." if hasattr(model, "head_path") else None
    encoder_note = ""
    if getattr(model, "captioner", False) and not any(k.startswith("encoder.") for k in weights):
        # a classifier's weights for a captioner: its encoder, without the classifier's head
        enc_head = f"encoder.{model.encoder.head_path}." if hasattr(model.encoder, "head_path") else "encoder.head."
        weights = {f"encoder.{k}": v for k, v in weights.items() if not f"encoder.{k}".startswith(enc_head)}
        own = {k: v for k, v in own.items() if k.startswith("encoder.") and not k.startswith(enc_head)}
        encoder_note = " into the captioning model's encoder (the decoder starts fresh)"
    skipped = [k for k, v in weights.items() if k in own and head and k.startswith(head)
               and (new_head or own[k].shape != v.shape)]
    for k in skipped:
        del weights[k]
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                 if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights and k not in skipped]
    unexpected = [k for k in weights if k not in own]
    if bad_shape or missing or unexpected:
        parts = [f"{name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for name, keys in (("shape differs", bad_shape), ("missing", missing), ("unexpected", unexpected))
                 if keys]
        hint = "use a file saved from the same architecture (see visrec summary MODEL)"
        first = next(iter(own))
        if first in weights and own[first].dim() == 4 and own[first].shape != weights[first].shape:
            want, have = tuple(weights[first].shape), tuple(own[first].shape)
            if want[1] != have[1]:
                hint = f"the weights take {want[1]}-channel images: add --set data.channels={want[1]}"
            elif want[2:] != have[2:]:
                hint = ("the weights have another stem (first layer): for small images visrec uses a 3x3 stem; "
                        "add --set model.kwargs.stem=imagenet")
        raise VisrecError(f"weight file {path} does not fit model {type(model).__name__}: {'; '.join(parts)}", hint)
    model.load_state_dict(weights, strict=False)
    note = f"loaded {path}{encoder_note}" + (
        f"; classifier head {', '.join(skipped)} re-initialized for this dataset's classes" if skipped else "")
    return note, norm
