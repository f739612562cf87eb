"""Typed configuration: dataclass sections, YAML presets, and `section.key=value` overrides.

A config is resolved in three layers: the dataclass defaults (the default recipe), then a preset
(a YAML file shipped in `visrec/presets/` or any path), then `--set` overrides. Unknown sections and
keys are errors that list the valid ones. The resolved config is written into every run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .coerce import (
    AtLeast1,
    Fraction,
    NonNeg,
    NonNegInt,
    OpenFraction,
    Pattern,
    Positive,
    Range,
)
from .coerce import coerce as _coerce
from .coerce import field_types as _class_field_types
from .errors import VisrecError, closest, unknown_name

# The choices of each key. The registries that act on them (optimizers, schedules, losses, fine-tune strategies,
# TTA modes, precisions) are checked against these lists by the tests.
Normalize = Literal["channel", "image", "none", "pca", "pca_whiten", "zca"]
OnOffAuto = Literal["auto", "on", "off"]
OptimizerName = Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lbfgs", "muon"]
ScheduleName = Literal["constant", "step", "exponential", "inverse_time", "linear", "cosine", "cyclic_cosine",
                       "one_cycle"]
LossName = Literal["cross_entropy", "hinge"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Select = Literal["last", "best"]
NonFinitePolicy = Literal["stop", "skip"]
TTA = Literal["auto", "none", "flip", "crops", "crops+flip", "scales", "scales+flip"]
Strategy = Literal["none", "linear", "last", "full", "two_stage"]
Duration = Annotated[str, Pattern(r"|\d+(\.\d*)?\s*(s|m|h|sec|min)?",
                                  "a duration such as 90s, 5m, 1.5h or 300 (seconds); empty for none")]
DeviceName = Annotated[str, Pattern(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", "auto, cpu, cuda, cuda:N or mps")]

def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds in "90s", "5m", "1.5h", "300" (seconds), or None for "" / None / 0.

    >>> parse_duration("1.5m"), parse_duration("2h"), parse_duration(""), parse_duration(45)
    (90.0, 7200.0, None, 45.0)
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h)?\s*", text)
        if not m:
            raise VisrecError(f"{text!r} is not a duration", "write it as 90s, 5m, 1.5h or a number of seconds")
        value = float(m.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}[m.group(2)]
    return value if value > 0 else None


def parse_size(text: str | int | float, option: str) -> int:
    """Bytes in "512MB", "4GB", "64KB", "1.5g" or a number of bytes (binary units); `option` names it in errors.

    >>> parse_size("512MB", "x"), parse_size("1.5GB", "x"), parse_size(4096, "x")
    (536870912, 1610612736, 4096)
    """
    if isinstance(text, int | float):
        return int(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise VisrecError(f"{option} {text!r} is not a size", "give bytes, or e.g. 512MB, 4GB")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)])


# Keys that moved when the train section was split by concern: old config files, presets and --set still work.
RENAMED = {
    "train.device": "device.name", "train.precision": "device.precision", "train.threads": "device.threads",
    "train.ema": "average.ema", "train.swa": "average.swa", "train.swa_lr": "average.swa_lr",
    "train.swa_every": "average.swa_every",
    "train.log_every": "log.every", "train.report": "log.report", "train.histograms": "log.histograms",
}


@dataclass
class DataConfig:
    name: str = "fashion-mnist"  # catalog name, `folder:PATH`, `coco:PATH`, `yolo:PATH` or `synthetic[:k=v,...]`
    data_dir: str | None = None  # searched first for the dataset's files (also $VISREC_DATA)
    normalize: Normalize = "channel"  # channel (per-channel mean/std) | image (mean image) | none (raw 0..255)
    #   | pca (the top pca_k principal components, as k features) | pca_whiten (those, each of unit variance)
    #   | zca (whitened, rotated back to image layout); all fitted on the training split
    pca_k: AtLeast1 | None = None  # pca, pca_whiten: components kept (default: 95% of the variance); zca: the rank
    pca_eps: NonNeg = 0.01  # whitening: added to each eigenvalue (pixel values scaled to 0..1)
    augment: list[str] = field(default_factory=lambda: ["hflip"])  # names, `name:arg` (see visrec.data.augment)
    val_fraction: OpenFraction = 0.1  # of the training split, held out (stratified) for validation
    test_fraction: Annotated[float, Range(0, 1, open_low=True, open_high=True)] = 0.2  # datasets without a test split
    split_seed: int = 0  # seed of the val/test splits, independent of the training seed
    subset: AtLeast1 | None = None  # train on a stratified subset of this many training images
    image_size: AtLeast1 | None = None  # folder datasets: resize every image to this square size
    channels: Literal[1, 3] | None = None  # folder datasets: 1 or 3; None = 3 if any image has color
    download: bool = True  # fetch from the official source when no local copy is found
    skip_bad_images: bool = False  # folder datasets: leave bad files out (listed in the run) instead of failing
    max_pixels: AtLeast1 = 89_478_485  # folder datasets: larger images are refused from their header (bombs)
    # folder datasets: memory = decode on every run; disk = decode once into a memory-mapped file in the user cache
    # (later runs start without decoding); none = stream: worker processes read the files batch by batch, training on
    # random-resized crops of the originals; auto = memory under 64 MB decoded, disk within data.memory_budget, none
    # above it
    cache: Literal["auto", "memory", "disk", "none"] = "auto"
    memory_budget: str = "auto"  # data.cache=auto: decoded training sets above this stream (bytes, 512MB, 4GB; auto =
    #   an eighth of this machine's memory)
    workers: NonNegInt = 0  # streamed data: DataLoader worker processes (0 = one per CPU core, at most 8)
    # folder datasets: evaluation and prediction resize each image to cover data.image_size and keep the central
    # crop_pct of it (timm's crop_pct); None = 0.875 when training streams random-resized crops, else 1 (all of it)
    crop_pct: Annotated[float, Range(0, 1, open_low=True)] | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # streamed training: random-resized crops'
    #   share of the image's area (timm's scale)
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # ... and their aspect ratio range
    # wds: shards: random = each sample by a byte-range read, in an exact seeded permutation (local disks); sequential
    # = each worker reads its own shards whole, through a shuffle buffer (object storage); auto = sequential for URLs
    shard_read: Literal["auto", "random", "sequential"] = "auto"
    shuffle_buffer: AtLeast1 = 1000  # shard_read=sequential: samples each worker draws its next one from at random
    max_bad_fraction: Fraction = 0.01  # streamed data: files that cannot be read are left out and listed; more than
    #   this fraction of them stops the run
    classes: list[str] = field(default_factory=list)  # keep only these classes (by name); empty = all
    scene_size: Annotated[int, Range(32)] = 64  # scenes: canvas side in pixels
    max_objects: Annotated[int, Range(1, 16)] = 4  # scenes: objects per canvas, 1 to this many
    max_caption_length: AtLeast1 = 30  # captioning: words kept per caption (longer ones are cut, and counted)
    scene_count: AtLeast1 = 10_000  # scenes: training canvases (validation gets a tenth, test a fifth)


@dataclass
class ModelConfig:
    name: str = "convnet"  # a registered model, `timm:NAME` or `path/to/file.py:function`
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model (see `visrec models`)
    pretrained: bool = False  # timm:NAME models: start from timm's pretrained weights (downloaded once, then cached)
    channels_last: OnOffAuto = "auto"  # auto | on | off (auto: on for conv nets, where it measures faster)
    compile: bool = False  # torch.compile the model (slow first steps, faster later)
    # default | normal:STD | xavier | xavier_normal | he | he_fan_out | he_uniform | orthogonal | lsuv (conv and linear
    # weights, biases zeroed; see visrec.models.init)
    init: str = "default"
    weights: str = ""  # start from this weight file (.safetensors, or a .pt state_dict read without pickle code)
    trust_checkpoint: bool = False  # allow a .pt file that needs full unpickling (runs code from the file)


@dataclass
class OptimConfig:
    name: OptimizerName = "nesterov"  # sgd | momentum | nesterov | adagrad | rmsprop | adam | adamw | lbfgs | muon
    lr: Positive = 0.2  # peak learning rate (the schedule multiplies it)
    muon_lr: Positive = 0.05  # muon: the conv kernels' peak step (the rest trains by Nesterov SGD at lr)
    momentum: Fraction = 0.9  # momentum / nesterov / rmsprop
    weight_decay: NonNeg = 5e-4  # L2 penalty (decoupled for adamw)
    decay_all: bool = False  # also decay biases and normalization parameters (off by default)
    betas: list[Annotated[float, Range(0, 1, open_high=True)]] = field(default_factory=lambda: [0.9, 0.999])  # adam
    eps: Positive = 1e-8  # adagrad / rmsprop / adam / adamw
    alpha: Fraction = 0.99  # rmsprop: decay rate of the squared-gradient average
    grad_clip: NonNeg = 0.0  # clip the global gradient norm to this value; 0 = off
    # annealed Gaussian gradient noise (Neelakantan et al.): variance grad_noise / (1 + step)^grad_noise_gamma is
    # added to every gradient before clipping; 0 = off (the paper tries 0.01, 0.3 and 1)
    grad_noise: NonNeg = 0.0
    grad_noise_gamma: NonNeg = 0.55
    # lbfgs: full-batch L-BFGS (torch.optim.LBFGS, strong-Wolfe line search); each optimizer step runs up to
    # lbfgs_iters iterations. It is refused when minibatches, augmentation, dropout or gradient noise make the
    # objective noisy, unless lbfgs_noisy=true
    lbfgs_iters: Annotated[int, Range(1, 10_000)] = 20
    lbfgs_history: Annotated[int, Range(1, 1000)] = 10
    lbfgs_noisy: bool = False


@dataclass
class ScheduleConfig:
    # constant | step | exponential | inverse_time | linear | cosine | cyclic_cosine | one_cycle
    name: ScheduleName = "one_cycle"
    warmup_epochs: NonNeg = 0.0  # linear warmup from start_factor*lr, before any schedule
    start_factor: Fraction = 0.1  # one_cycle and warmup start at this * lr
    end_factor: Fraction = 0.001  # linear / cosine / one_cycle end at this fraction of lr
    pct_start: Annotated[float, Range(0, 1, open_low=True, open_high=True)] = 0.25  # one_cycle: share spent rising
    step_epochs: Positive = 10.0  # step: epochs between decays
    gamma: Annotated[float, Range(0, 1, open_low=True)] = 0.1  # step: factor per decay; exponential: per epoch
    decay: NonNeg = 0.5  # inverse_time: lr / (1 + decay * epoch)
    cycles: AtLeast1 = 4  # cyclic_cosine: cosine cycles with warm restarts; each ends with a snapshot checkpoint


@dataclass
class LossConfig:
    name: LossName = "cross_entropy"  # cross_entropy (softmax) | hinge (multiclass SVM)
    label_smoothing: OpenFraction = 0.1  # cross_entropy only
    margin: Positive = 1.0  # hinge only: the margin delta


@dataclass
class TrainConfig:
    """What the loop does: how long, in what batches, from which seed, and what it keeps."""

    epochs: AtLeast1 = 8
    # a time budget instead of an epoch count: "60s", "5m", "1.5h" (or plain seconds); the schedule is stretched or
    # shrunk to end when the training steps have taken that long (measured throughput; evaluation not counted).
    # Giving train.epochs (--epochs) without it clears a budget that a preset set
    time_budget: Duration = ""
    # progressive resizing (classification): train at this shorter side in pixels, then at full size from
    # progressive_until of the schedule on; 0 = off
    progressive_size: NonNegInt = 0
    progressive_until: Fraction = 0.5
    batch_size: AtLeast1 = 256
    seed: int = 0  # weights, batch order and augmentation
    select: Select = "last"  # weights evaluated on test at the end: last | best (by the task's validation metric)
    nonfinite: NonFinitePolicy = "stop"  # what a NaN/inf loss does: stop (with a diagnosis) | skip (drop the step)
    checkpoint_every: NonNegInt = 0  # also checkpoint every N steps; 0 = at the end of each epoch only
    min_epoch_steps: NonNegInt = 20  # small datasets: halve the batch (not below 16) until an epoch has this many
    engine: Literal["torch", "numpy"] = "torch"  # numpy: the network's passes and update rule run in visrec.ref
    # across processes (torchrun, or visrec train --nproc N): the backend (auto: gloo on CPU, nccl on CUDA), the
    # seconds any collective may wait for a rank before every rank stops with an error, and SyncBatchNorm (CUDA)
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    dist_timeout: Annotated[float, Range(1)] = 300.0
    sync_bn: bool = False


@dataclass
class DeviceConfig:
    """Where the loop runs and in what number format."""

    name: DeviceName = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: Precision = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 | fp16
    threads: NonNegInt = 0  # CPU threads; 0 = PyTorch's default (one per core)


@dataclass
class AverageConfig:
    """Weight averages evaluated beside the raw weights: EMA and SWA (with batch-norm recompute)."""

    ema: OpenFraction = 0.0  # decay of an exponential moving average of the weights per step; 0 = off
    swa: Annotated[float, Range(0, 1, open_high=True, hint="the final fraction of training averaged, e.g. 0.25")] = 0.0
    swa_lr: NonNeg = 0.0  # during SWA, hold the lr at this fraction of optim.lr; 0 = keep the schedule
    swa_every: NonNegInt = 0  # SWA: add the weights to the average every N steps; 0 = at the end of each epoch


@dataclass
class LogConfig:
    """What the run folder records besides checkpoints."""

    every: AtLeast1 = 50  # steps per logged window (metrics.jsonl, TensorBoard, progress)
    report: bool = True  # write report.html (curves, confusion, explanations) when training completes
    histograms: NonNegInt = 1  # TensorBoard weight/activation histograms every N epochs; 0 = none


@dataclass
class EvalConfig:
    batch_size: NonNegInt = 0  # 0 = automatic: 1024 on a GPU, on a CPU a batch that stays in the caches (64 at 28x28)
    tta: TTA = "auto"  # none | flip | crops | crops+flip | scales | scales+flip | auto (flip if trained with hflip)
    crop_pad: NonNegInt = 0  # crops: shift by this many pixels; 0 = the pad of a crop/translate augmentation, else 2
    feature_run: str = ""  # generate: FID/KID features: a classification run, inception:PATH, none, or "" (a
    #   convnet trained once on the same dataset and cached)
    samples: AtLeast1 = 1000  # generate: samples drawn for FID, KID and class coverage (and as many real images)
    fid_every: AtLeast1 = 1  # generate: FID, KID and coverage on the validation split every N epochs (drawing the
    #   samples costs); the best checkpoint of a GAN is chosen among those epochs; the test split always has them
    sample_steps: NonNegInt = 100  # generate, ddpm: DDIM steps when evaluating (0: every diffusion step, ancestral)
    # generate, vae: importance samples per image for the test NLL, and the test images it is averaged over. 100 on
    # 500 images takes about 30 s for the default VAE on a 2-core CPU (500 on 1,000 took 5.5 min); more tighten the
    # bound by little (it shrinks as log k)
    importance_samples: AtLeast1 = 100
    nll_images: AtLeast1 = 500


@dataclass
class DistillConfig:
    teachers: list[str] = field(default_factory=list)  # runs (RUN, RUN:last, RUN:best) whose mean soft output teaches
    temperature: Positive = 4.0  # softens teacher and student probabilities in the soft-target loss
    alpha: Fraction = 0.5  # weight of the soft-target loss; the true labels get 1 - alpha


@dataclass
class FinetuneConfig:
    strategy: Strategy = "none"  # none | linear | last | full | two_stage (with model.weights: what trains, at what lr)
    stages: AtLeast1 = 1  # last: how many of the final stages train (the earlier ones stay frozen)
    backbone_lr: Annotated[float, Range(0, 10)] = 0.1  # lr of the stage next to the head, as a fraction of optim.lr
    stage_decay: Annotated[float, Range(0, 10)] = 0.5  # each stage further from the head gets this factor more
    head_epochs: AtLeast1 = 1  # two_stage: epochs that train only the head before everything trains
    cache_dir: str = ""  # linear: feature cache folder (default $VISREC_CACHE or ~/.cache/visrec/features)


@dataclass
class TaskConfig:
    name: str = "classification"  # classification, localization, segmentation, detection, instance, captioning, style,
    #   generate, keypoints, or file.py:Class
    # the chosen task's own options (`task.KEY`), declared by its class's `Options` dataclass and checked against it
    # when the config is resolved (unknown keys refused, with the task's options named); config.yaml writes them
    # under task: beside name
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    average: AverageConfig = field(default_factory=AverageConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["task"] = {"name": self.task.name, **copy.deepcopy(self.task.options)}  # task: {name, option: value}
        return d

    def anchored(self) -> Config:
        """A copy whose relative paths to files and folders that exist (a folder:, coco: or yolo: dataset, the data
        folder, a model or task file, weights, teacher runs, a style network's weights) are made absolute, so a run's
        config.yaml means the same from any working folder."""
        cfg = copy.deepcopy(self)
        prefix, sep, rest = cfg.data.name.partition(":")
        if sep and prefix in ("folder", "coco", "yolo"):
            cfg.data.name = f"{prefix}:{_absolute(rest)}"
        if cfg.data.data_dir:
            cfg.data.data_dir = _absolute(cfg.data.data_dir)
        cfg.model.name = _absolute_file_ref(cfg.model.name)
        cfg.task.name = _absolute_file_ref(cfg.task.name)
        if cfg.model.weights:
            cfg.model.weights = _absolute(cfg.model.weights)
        cfg.distill.teachers = [_absolute_run_ref(t) for t in cfg.distill.teachers]
        for key, value in cfg.task.options.items():  # a task's file-valued options: a file, a run, KIND:FILE
            if isinstance(value, str) and value:
                kind, sep, path = value.partition(":")
                cfg.task.options[key] = (f"{kind}:{_absolute(path)}" if sep and Path(path).expanduser().exists()
                                         else _absolute(value) if Path(value).expanduser().exists()
                                         else _absolute_run_ref(value))
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        apply_dict(cfg, d, source)
        check_task_options(cfg, source, stored=True)
        return cfg

    def set(self, key: str, value: Any, source: str = "--set") -> None:
        """Set one dotted key (`optim.lr`) to a value, with type checks."""
        _set_key(self, key, value, source)

    def keys(self) -> list[str]:
        """Every valid `section.key`: the sections' fields, and every registered task's options (task.KEY)."""
        out = []
        for sec in dataclasses.fields(self):
            for f in dataclasses.fields(getattr(self, sec.name)):
                if sec.name == "task" and f.name == "options":
                    out += [f"task.{k}" for k in _all_task_options()]
                else:
                    out.append(f"{sec.name}.{f.name}")
        return out


# A task's options are declared by its class (`Task.Options`, a dataclass typed like a config section). This layer
# knows no task: the package's facade installs `options_source` (a task's name -> its Options class) and
# `option_classes` (every registered task's name -> its Options class).
options_source: Callable[[str], type] | None = None
option_classes: Callable[[], dict[str, type]] | None = None


def _all_task_options() -> dict[str, list[str]]:
    """Every registered task's option names -> the tasks that declare each."""
    out: dict[str, list[str]] = {}
    for task, cls in (option_classes() if option_classes is not None else {}).items():
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append(task)
    return out


def coerce_options(cls: type, given: dict[str, Any], task: str, source: str) -> dict[str, Any]:
    """`given` task options checked against the task's Options dataclass and converted to its types; an unknown
    key is refused, naming the task's options (and the tasks that have it)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = _class_field_types(cls)
    out = {}
    for key, value in given.items():
        if key not in fields:
            e = unknown_name(f"option of task {task}", key, fields, source) if fields else VisrecError(
                f"{source}: task {task} has no options, and task.{key} was given")
            owners = _all_task_options().get(key)
            if owners:
                e.hint = (f"task.{key} is an option of task {' and '.join(owners)}; "
                          + (f"task {task}'s options: {', '.join(sorted(fields))}" if fields else "leave it out"))
            raise e
        out[key] = _coerce(value, hints[key], f"task.{key}", source)
    return out


def check_task_options(cfg: Config, source: str = "config", stored: bool = False) -> None:
    """The config's task options checked against its task's Options (where the task can be found here: a task in a
    file that cannot be imported is checked when the run builds it). `stored`: a config read back from a run folder,
    whose task section may hold every task's options (the one flat section visrec wrote before tasks declared
    their own): another task's options are dropped there, and only keys no task declares are refused."""
    if options_source is None or not cfg.task.options:
        return
    try:
        cls = options_source(cfg.task.name)
    except VisrecError:
        return
    given = cfg.task.options
    if stored:
        own = {f.name for f in dataclasses.fields(cls)}
        others = _all_task_options()
        given = {k: v for k, v in given.items() if k in own or k not in others}
    cfg.task.options = coerce_options(cls, given, cfg.task.name, source)


def _absolute(path: str) -> str:
    """`path` made absolute (a leading ~ expanded) when it exists from here; else as given."""
    p = Path(path).expanduser()
    return os.path.abspath(p) if p.exists() else path


def _absolute_file_ref(ref: str) -> str:
    """`path/to/file.py:name` with its file made absolute; other references (registered names, timm:NAME) as given."""
    file, sep, name = ref.rpartition(":")
    return f"{_absolute(file)}:{name}" if sep and file.endswith(".py") else ref


def _absolute_run_ref(ref: str) -> str:
    """A run folder, or `RUN:last`/`RUN:best`, with the folder made absolute when it exists."""
    run, sep, tag = ref.rpartition(":")
    if sep and tag in ("last", "best", "auto") and Path(run).expanduser().is_dir():
        return f"{_absolute(run)}:{tag}"
    return _absolute(ref) if ref and Path(ref).expanduser().is_dir() else ref


def _field_types(obj: Any) -> dict[str, Any]:
    return _class_field_types(type(obj))


def _key_type(key: str) -> Any:
    """The declared type of a key: a section's field, or a registered task's option."""
    section, name = _canonical(key).split(".")
    if section == "task" and name != "name":
        for cls in (option_classes() if option_classes is not None else {}).values():
            hints = _class_field_types(cls)
            if name in hints:
                return hints[name]
        raise KeyError(f"{key} is no registered task's option")
    return _field_types(getattr(Config(), section))[name]


def choices(key: str) -> tuple:
    """The valid values of a key with a fixed set of them (`choices("train.select")` -> ("last", "best"))."""
    tp = _key_type(key)
    while typing.get_origin(tp) in (Annotated, typing.Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if typing.get_origin(tp) is not Literal:
        raise KeyError(f"{key} has no fixed choices")
    return typing.get_args(tp)


def bounds(key: str) -> tuple[float | None, float | None]:
    """The natural (low, high) limits of a numeric key, from its declared range; None where it has none."""
    tp = _key_type(key)
    lo = hi = None
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            for rule in tp.__metadata__:
                if isinstance(rule, Range):
                    lo, hi = rule.low, rule.high
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType, list):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        else:
            return lo, hi


def _canonical(key: str) -> str:
    """A key's current name: keys of the old single train section map to their new sections."""
    head = ".".join(key.split(".")[:2])
    return RENAMED[head] + key[len(head):] if head in RENAMED else key


# what other tools call visrec's keys: suggested, never applied silently
SYNONYMS = {"learning_rate": "lr", "learningrate": "lr", "wd": "weight_decay", "decay": "weight_decay",
            "l2": "weight_decay", "bs": "batch_size", "batch": "batch_size", "batchsize": "batch_size",
            "n_epochs": "epochs", "num_epochs": "epochs", "max_epochs": "epochs", "epoch": "epochs",
            "optimizer": "name", "arch": "name", "architecture": "name", "size": "image_size", "img_size": "image_size",
            "imgsz": "image_size", "input_size": "image_size", "workers": "num_workers"}


def _owners(cfg: Config, name: str, prefer: str | None = None) -> list[str]:
    """`section.key` of every section with key `name` (or the key its synonym names), `prefer`'s first."""
    name = SYNONYMS.get(name.lower(), name)
    out = [f"{sec.name}.{name}" for sec in dataclasses.fields(cfg)
           if name in {f.name for f in dataclasses.fields(getattr(cfg, sec.name))}]
    return sorted(out, key=lambda k: k.split(".")[0] != prefer)


def _set_key(cfg: Config, key: str, value: Any, source: str) -> None:
    key = _canonical(key)
    if key == "model.kwargs.pretrained":  # before it was a key of its own
        key = "model.pretrained"
    parts = key.split(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if parts[0] not in sections and len(parts) == 1:
        owners = _owners(cfg, parts[-1])
        if owners:  # `lr=0.1`: a key given without its section
            raise VisrecError(f"{source}: {key!r} names no config section", f"did you mean {' or '.join(owners)}? "
                              "Keys are section.key (`visrec config --keys` lists them)")
    if parts[0] not in sections:
        raise unknown_name("config section", parts[0], sections, source)
    section = getattr(cfg, parts[0])
    if len(parts) == 1:
        keys = ", ".join(_keys_of(section, parts[0]))
        raise VisrecError(f"{source}: {key!r} is a section; set one of its keys: {keys}")
    names = {f.name for f in dataclasses.fields(section)}
    if parts[0] == "task" and parts[1] != "name":  # a task's own option: checked when the task is known
        if len(parts) > 2 and parts[1] == "options":
            parts = ["task", *parts[2:]]
        if len(parts) != 2:
            raise VisrecError(f"{source}: {key!r} is not a task option", "task options are task.KEY=value")
        cfg.task.options[parts[1]] = value
        return
    if parts[1] not in names:
        e = unknown_name(f"key of section {parts[0]!r}", parts[1], names, source)
        owners = [o for o in _owners(cfg, parts[1], parts[0]) if o != key]
        if owners and owners[0].startswith(f"{parts[0]}."):
            owners = owners[:1]  # the section's own key by its other name (optim.learning_rate -> optim.lr)
        if owners and owners[0] != f"{parts[0]}.{closest(parts[1], names)}":  # another name, or another section
            e.hint = f"did you mean {' or '.join(owners)}?"
        raise e
    tp = _field_types(section)[parts[1]]
    if len(parts) > 2:
        # Nested mapping (model.kwargs.width=32): the leaf's value is free-form.
        if typing.get_origin(tp) is not dict:
            raise VisrecError(f"{source}: {'.'.join(parts[:2])} is not a mapping; {key!r} cannot be set")
        d = getattr(section, parts[1])
        for p in parts[2:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
        return
    value = _coerce(value, tp, key, source)
    if key == "model.kwargs" and "pretrained" in value:
        value = dict(value)
        section.pretrained = _coerce(value.pop("pretrained"), bool, "model.pretrained", source)
    setattr(section, parts[1], value)


def validate(cfg: Config, source: str = "config") -> None:
    """Check every value against its type, choices and range; for configs whose attributes were set directly
    (`cfg.train.select = "bst"`) rather than through `Config.set`, where values are checked as they are parsed."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for name, tp in _field_types(section).items():
            _coerce(getattr(section, name), tp, f"{sec.name}.{name}", source)


def _keys_of(section: Any, name: str) -> list[str]:
    return [f"{name}.{f.name}" for f in dataclasses.fields(section)]


def apply_dict(cfg: Config, d: dict[str, Any], source: str) -> None:
    """Apply a nested mapping ({section: {key: value}}) onto a config."""
    if not isinstance(d, dict):
        raise VisrecError(f"{source}: expected a mapping of sections (data:, model:, ...), got {type(d).__name__}")
    for sec, body in d.items():
        if body is None:
            continue
        if not isinstance(body, dict):
            raise VisrecError(f"{source}: section {sec!r} must be a mapping of keys, got {body!r}")
        for k, v in body.items():
            _set_key(cfg, f"{sec}.{k}", v, source)


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=0.1` -> ("optim.lr", 0.1); values are read as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise VisrecError(f"--set {text!r} is not of the form section.key=value", "for example: --set optim.lr=0.05")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def list_presets() -> dict[str, str]:
    """Shipped preset names -> the first sentence of their leading comment (what the preset is for)."""
    out = {}
    for entry in sorted(resources.files("visrec.presets").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            lines = []
            for line in entry.read_text().splitlines():
                if not line.startswith("#"):
                    break
                lines.append(line.lstrip("# ").strip())
            text = " ".join(x for x in lines if x)
            end = text.find(". ")
            out[entry.name[:-5]] = text[: end + 1] if end >= 0 else text
    return out


def load_preset(name: str) -> dict[str, Any]:
    """A preset by shipped name or by path to a YAML file."""
    path = Path(name)
    if name.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise VisrecError(f"preset file {name} does not exist", "give a shipped preset name or a YAML path")
        text, source = path.read_text(), str(path)
    else:
        entry = resources.files("visrec.presets") / f"{name}.yaml"
        if not entry.is_file():
            raise unknown_name("preset", name, list_presets(), "--preset")
        text, source = entry.read_text(), f"preset {name}"
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise VisrecError(f"{source} is not valid YAML: {e}") from None


# A task's recipe (the values its models train under, between the built-in defaults and the preset) and its
# per-model recipes are declared on its class (`Task.recipe`, `Task.model_recipes`). This layer knows no task:
# the package's facade (visrec/__init__.py) installs `recipe_source`, which asks the task's class by name.
RecipeSource = Callable[[str], tuple[dict[str, Any], dict[str, dict[str, Any]]]]
recipe_source: RecipeSource | None = None


def task_recipe(task: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the task's recipe, its per-model recipes by model name); empty for a task that cannot be found here (the
    run's task check names it, with the choices)."""
    if recipe_source is None:
        return {}, {}
    try:
        return recipe_source(task)
    except VisrecError:
        return {}, {}


def _named(preset: dict[str, Any], items: list[tuple[str, Any]], options: dict[str, Any] | None,
               section: str = "task") -> str | None:
    """`SECTION.name` as the preset, then the overrides, then the options set it (None when none does)."""
    name = (preset.get(section) or {}).get("name") if isinstance(preset.get(section), dict) else None
    for key, value in items:
        if key == f"{section}.name":
            name = value
    if (options or {}).get(f"{section}.name") is not None:
        name = options[f"{section}.name"]
    return name


def resolve_config(
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: Config | None = None,
    options: dict[str, Any] | None = None,
) -> Config:
    """Defaults (or `base`), then the task's recipe (`Task.recipe`, not over a `base`), then the preset, then
    overrides (`["optim.lr=0.1"]` or `{"optim.lr": 0.1}`), then
    `options`: dotted keys of dedicated options or arguments (`{"train.epochs": 3}`), None meaning "not given"."""
    cfg = Config.from_dict(base.to_dict()) if base is not None else Config()
    preset_dict = load_preset(preset) if preset else {}
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(o) for o in overrides or []]
    task = _named(preset_dict, items, options)
    recipe, model_recipes = task_recipe(task) if base is None and task else ({}, {})
    for key, value in recipe.items():
        cfg.set(key, value)
    if recipe or model_recipes:
        model = _named(preset_dict, items, options, "model") or cfg.model.name
        for key, value in model_recipes.get(model, {}).items():
            cfg.set(key, value)
    if preset:
        apply_dict(cfg, preset_dict, f"preset {preset}")
    for key, value in items:
        cfg.set(key, value)
    for key, value in (options or {}).items():
        if value is not None:
            cfg.set(key, str(value) if isinstance(value, Path) else value, source="option")
    given = {k for k, _ in items} | {k for k, v in (options or {}).items() if v is not None}
    if "train.epochs" in given and "train.time_budget" not in given:
        cfg.train.time_budget = ""  # an epoch count asked for replaces a budget the preset (or base) set
    check_task_options(cfg, "the config")
    return cfg
