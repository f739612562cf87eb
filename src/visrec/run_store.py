"""Run folders as stored: everything about one training run, and the only thing tools that inspect it read.
The run API above it (`visrec.runs.Run`: evaluate, predict) asks the run's task; this layer knows no task.

    runs/<dataset>-<model>-<time>/
      config.yaml      the resolved config          splits.json   how val/test were made
      metrics.jsonl    one record per window/epoch  tb/           TensorBoard events
      checkpoints/     last.* (resumable), best.*   summary.json  final numbers and status
      confusion.csv / confusion.png / per_class.csv (test)        model.txt     the architecture
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .config import Config
from .data import Dataset, Normalizer, load_dataset
from .data.images import Fit, native_channels, peek
from .data.imageset import ImageSet
from .device import resolve_device, use_channels_last
from .errors import VisrecError
from .inference import BACKENDS, check_backend
from .models import create_model


def remap_classes(data: ImageSet, run_classes: list[str]) -> ImageSet:
    """Labels of `data` re-expressed in the run's class order, matched by name, never by position.

    Reordered or missing classes are remapped; a class the run never learned is refused."""
    if data.classes == run_classes:
        return data
    extra = [c for c in data.classes if c not in run_classes]
    if extra:
        raise VisrecError(f"the data has classes the model was never trained on: {', '.join(extra)}",
                          f"the model knows: {', '.join(run_classes)}; remove the others, or train a new run")
    index = torch.tensor([run_classes.index(c) for c in data.classes], dtype=torch.long)
    return ImageSet(data.images, index[data.labels], list(run_classes), data.name)


def dataset_from_config(cfg: Config) -> Dataset:
    d = cfg.data
    return load_dataset(d.name, data_dir=d.data_dir, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                        split_seed=d.split_seed, subset=d.subset, download=d.download, image_size=d.image_size,
                        channels=d.channels, skip_bad_images=d.skip_bad_images, max_pixels=d.max_pixels,
                        classes=d.classes or None, scene_size=d.scene_size, max_objects=d.max_objects,
                        scene_count=d.scene_count, cache=d.cache, memory_budget=d.memory_budget,
                        crop_pct=d.crop_pct, max_bad_fraction=d.max_bad_fraction)


def setup_config(
    data: str | Dataset | None,
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    config: Config | None = None,
    **keys: Any,
) -> tuple[Config, Dataset | None]:
    """The config of a library call: defaults < preset < overrides < explicit arguments.

    `data` is a dataset name, a folder's path (read as folder:PATH, coco: or yolo: by its layout, as on the
    command line) or an already loaded Dataset (returned as is); `keys` maps dotted config keys (with `_` for
    `.`, e.g. `optim_lr`) to values, None meaning "not given".
    """
    from .config import resolve_config
    from .data.catalog import source_name

    dataset = data if isinstance(data, Dataset) else None
    if isinstance(data, str | Path) and dataset is None:
        data = source_name(str(data))
    options = {"data.name": data.name if dataset is not None else data,
               **{key.replace("_", ".", 1): value for key, value in keys.items()}}
    return resolve_config(preset, overrides, base=config, options=options), dataset


def run_label(data_name: str, model_name: str) -> str:
    """`<dataset>-<model>`, with folder and file paths reduced to their last name (folder:, coco: and yolo: data
    by their folder's name, so two folders get two labels)."""
    from .data.catalog import slug, source_label

    model = (model_name.split(":", 1)[1] if model_name.startswith("timm:")
             else Path(model_name.rsplit(":", 1)[0]).stem if ":" in model_name else model_name)
    return f"{source_label(data_name)}-{slug(model, 'run')}"


def default_run_name(data_name: str, model_name: str) -> str:
    """`<dataset>-<model>-<YYYYmmdd-HHMMSS>` (see `run_label`)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{run_label(data_name, model_name)}-{stamp}"
    name, i = base.name, 2
    while (base.parent / name).exists():
        name, i = f"{base.name}-{i}", i + 1
    return name


@dataclass
class LoadedModel:
    model: nn.Module
    normalizer: Normalizer
    classes: list[str]
    in_chans: int
    image_size: tuple[int, int]
    checkpoint: str
    backend: str = "torch"  # what runs `model`: a name of visrec.inference.BACKENDS (onnx: an onnxruntime session)
    backend_note: str = ""  # why `auto` chose torch, when it did not choose onnx
    fit: Fit | None = None  # how training made a file the model's input (runs from image folders): applied to files
    channels_last: bool = False  # batches go to `model` in channels_last memory format


def check_file(path: Path, channels: int, size: tuple[int, int] | None, resize: bool, convert: bool,
               max_pixels: int | None = None) -> None:
    """The rule for every task's image files: a file that is not the model's input (a color image for a grayscale
    model; another (height, width) than `size`, None for models that take any size) is refused, naming the option
    that fixes it, unless `convert` / `resize` allow the change (see `Run.input_fixes`)."""
    if not path.is_file():
        raise VisrecError(f"image file {path} does not exist")
    mode, (iw, ih) = peek(path, max_pixels, limit_option="--max-pixels N")
    fixes = []
    if channels == 1 and native_channels(mode) == 3 and not convert:
        fixes.append(("--convert", f"it is a color image ({mode}) but the model takes grayscale"))
    if size is not None and (ih, iw) != size and not resize:
        fixes.append(("--resize", f"it is {iw}x{ih} (width x height) but the model takes {size[1]}x{size[0]}"))
    if fixes:
        raise VisrecError(f"{path}: " + "; ".join(why for _, why in fixes),
                          f"pass {' '.join(opt for opt, _ in fixes)} (library: "
                          f"{', '.join(opt[2:] + '=True' for opt, _ in fixes)})")


class RunFolder:
    """A run folder as stored: its config, metrics, summary and checkpoints, and its model loaded with its
    preprocessing. `visrec.runs.Run` adds what a run answers (evaluate, predict), through the run's task."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.yaml").is_file():
            raise VisrecError(f"{self.path} is not a visrec run folder (it has no config.yaml)",
                              "give the folder a `visrec train` run wrote, e.g. runs/<name>")
        self._loaded: dict[tuple[str, str], LoadedModel] = {}
        self._config: tuple[tuple[int, int], Config] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Config:
        """The run's resolved config (a fresh copy: changing it changes nothing on disk), read again when the file
        changes."""
        path = self.path / "config.yaml"
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if self._config is None or self._config[0] != stamp:
            self._config = (stamp, Config.from_dict(yaml.safe_load(path.read_text()), str(path)))
        return copy.deepcopy(self._config[1])

    @property
    def summary(self) -> dict[str, Any]:
        p = self.path / "summary.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def status(self) -> str:
        return self.summary.get("status", "running or stopped")

    def metrics(self, split: str | None = None) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.is_file():
            return []
        recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [r for r in recs if split is None or r.get("split") == split]

    def snapshots(self) -> list[str]:
        """Tags of the snapshot checkpoints a cyclic schedule saved (snapshot1, snapshot2, ...), in order."""
        found = [p.stem for p in (self.path / "checkpoints").glob("snapshot*.json") if p.stem[8:].isdigit()]
        return sorted(found, key=lambda t: int(t[8:]))

    def checkpoint_tag(self, which: str) -> str:
        """`auto` (the weights the run was evaluated with), `last`, `best` or `snapshotK` -> a checkpoint tag."""
        if which == "auto":
            return "best" if self.summary.get("eval_weights", "last").startswith("best") else "last"
        if which in ("last", "best") or which in self.snapshots():
            return which
        raise VisrecError(f"{self.path} has no checkpoint {which!r}",
                          f"use one of: auto, last, best{''.join(', ' + t for t in self.snapshots())}")

    def load_model(self, which: str = "auto", device: str = "cpu", backend: str = "torch",
                   outputs: str = "tensor") -> LoadedModel:
        """The trained model in eval mode, with its preprocessing and class names.

        `auto` picks the weights the run was evaluated with (last or best; its SWA or EMA average if it had one).
        `backend`: a name of `visrec.inference.BACKENDS` (torch, channels_last, compile, onnx), or auto: onnx on
        CPU when the network exports and agrees with torch, else torch (`backend_note` says why). `outputs`: what
        the caller reads from the network (`tensor`, or `structured` for detectors' dicts and decoding loops); a
        backend that cannot produce it is refused.
        """
        from .checkpoint import load_checkpoint

        check_backend(backend, outputs, f"{self.path} (a run of task {self.config.task.name})")
        tag = self.checkpoint_tag(which)
        key = (tag, device)
        if key not in self._loaded:
            ckpt = load_checkpoint(self.path / "checkpoints", tag)
            spec = ckpt.meta["model"]
            size = tuple(spec["image_size"])
            net_c, *net_size = spec.get("net_input", [spec["in_chans"], *size])  # differs after pca
            model = create_model(spec["name"], in_chans=net_c, num_classes=spec["num_classes"],
                                 image_size=tuple(net_size), **spec["kwargs"])
            model.load_state_dict(ckpt.swa or ckpt.ema or ckpt.weights)
            dev = resolve_device(device)
            cl = use_channels_last(self.config.model.channels_last, model)
            model.to(dev, memory_format=torch.channels_last if cl else torch.contiguous_format).eval()
            norm = Normalizer.from_state(ckpt.meta["preprocess"], ckpt.extra.get("preprocess")).to(dev)
            self._loaded[key] = LoadedModel(model, norm, ckpt.meta["classes"], spec["in_chans"], size,
                                            str(ckpt.path), fit=Fit.from_state(ckpt.meta.get("input")),
                                            channels_last=cl)
        lm = self._loaded[key]
        if backend == "torch" or (backend == "auto" and outputs not in BACKENDS["onnx"].outputs):
            return lm
        bkey = (tag, device, backend, outputs)
        if bkey not in self._loaded:
            self._loaded[bkey] = self._backend_model(lm, tag, backend, outputs)
        return self._loaded[bkey]

    def _backend_model(self, lm: LoadedModel, tag: str, backend: str, outputs: str) -> LoadedModel:
        """`lm` with its network run by `backend`, or (backend auto) by onnx when it can, else `lm` itself with the
        reason in its note."""
        dev = next(lm.model.parameters()).device
        spec = BACKENDS["onnx" if backend == "auto" else backend]
        try:
            if spec.cpu_only and dev.type != "cpu":
                raise VisrecError(f"the {spec.name} backend runs on the CPU, and this model is on {dev}",
                                  "use --device cpu, or --backend torch")
            g = torch.Generator().manual_seed(0)
            pixels = torch.randint(0, 256, (3, lm.in_chans, *lm.image_size), generator=g, dtype=torch.uint8)
            example = lm.normalizer(torch.cat([pixels, torch.full_like(pixels[:1], 128)]).to(dev)).float()
            net = spec.build(lm.model, example,
                             self.path / "export" / f"network-{tag}.onnx", Path(lm.checkpoint))
        except VisrecError as e:
            if backend != "auto":
                raise
            return dataclasses.replace(lm, backend_note=f"{e.message} (so it ran on torch)")
        cl = lm.channels_last if spec.channels_last is None else spec.channels_last
        return dataclasses.replace(lm, model=net, backend=spec.name, channels_last=cl)

    def input_fixes(self, resize: bool | None, convert: bool | None) -> tuple[bool, bool]:
        """Whether image files are resized and converted to the model's input; None: as training did (a run trained
        on an image folder converted every file to its channels and fitted it to one size)."""
        cfg = self.config
        folder = cfg.data.name.startswith(("folder:", "wds:"))  # files, each fitted and converted
        return (folder if resize is None else resize,
                folder if convert is None else convert)

    def __repr__(self) -> str:
        s = self.summary
        acc = f", test_acc={s['test_acc']:.4f}" if s.get("test_acc") is not None else ""
        return f"Run({str(self.path)!r}, status={self.status!r}{acc})"


@dataclass(frozen=True)
class RunRef:
    """Weights of a run folder: `RUN` (the weights the run was evaluated with), `RUN:last`, `RUN:best`,
    `RUN:snapshotK`, or `RUN:snapshots` for every snapshot of a cyclic schedule (see `expand`).

    >>> RunRef.parse("runs/a:best")
    RunRef('runs/a:best')
    >>> RunRef.parse("weights.safetensors").which
    'auto'
    """

    path: Path
    which: str = "auto"

    @classmethod
    def parse(cls, spec: str | Path) -> RunRef:
        """Split a spec without opening the folder; a suffix that names no checkpoint stays part of the path."""
        text = str(spec)
        path, sep, which = text.rpartition(":")
        if not sep or not path or not (which in ("auto", "last", "best", "snapshots") or
                                       (which.startswith("snapshot") and which[8:].isdigit())):
            path, which = text, "auto"
        return cls(Path(path), which)

    @property
    def is_run(self) -> bool:
        return (self.path / "config.yaml").is_file()

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.path)

    def expand(self) -> list[RunRef]:
        """`RUN:snapshots` -> one reference per snapshot checkpoint; any other reference -> itself."""
        if self.which != "snapshots":
            return [self]
        tags = self.run.snapshots()
        if not tags:
            raise VisrecError(f"{self.path} saved no snapshots",
                              "train it with --set schedule.name=cyclic_cosine (one snapshot per cycle)")
        return [RunRef(self.path, t) for t in tags]

    def __str__(self) -> str:
        return str(self.path) if self.which == "auto" else f"{self.path}:{self.which}"

    def __repr__(self) -> str:
        return f"RunRef({str(self)!r})"


def expand_refs(specs: list[str | Path]) -> list[RunRef]:
    """Parse run references, each `RUN:snapshots` standing for all snapshots of its run."""
    return [r for spec in specs for r in RunRef.parse(spec).expand()]
