"""Run folders: everything about one training run, and the only thing tools that inspect it read.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .config import Config
from .data import Dataset, Normalizer, load_dataset
from .data.images import Fit, decode, native_channels, peek
from .data.imageset import ImageSet
from .device import resolve_device, resolve_precision, use_channels_last
from .errors import VisrecError, unknown_name
from .evaluate import TTA_MODES, EvalResult, evaluate, predict_logits, resolve_crop_pad, resolve_tta, tta_views
from .inference import BACKENDS
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
class Prediction:
    source: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first; empty when `error`
    error: str | None = None  # why this input could not be predicted (with errors="collect")

    @property
    def label(self) -> str:
        return self.top[0][0]

    def __repr__(self) -> str:
        best = ", ".join(f"{c} {p:.1%}" for c, p in self.top[:3])
        return f"Prediction({self.source}: {best})"


@dataclass
class LoadedModel:
    model: nn.Module
    normalizer: Normalizer
    classes: list[str]
    in_chans: int
    image_size: tuple[int, int]
    checkpoint: str
    backend: str = "torch"  # what runs `model`: torch, or onnx (an onnxruntime session standing in for it)
    backend_note: str = ""  # why `auto` chose torch, when it did not choose onnx
    fit: Fit | None = None  # how training made a file the model's input (runs from image folders): applied to files


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


class Run:
    """A run folder: its config, metrics, summary and checkpoints, with evaluate() and predict()."""

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

    def load_model(self, which: str = "auto", device: str = "cpu", backend: str = "torch") -> LoadedModel:
        """The trained model in eval mode, with its preprocessing and class names.

        `auto` picks the weights the run was evaluated with (last or best; its SWA or EMA average if it had one).
        `backend`: torch; onnx (the network's ONNX graph through onnxruntime, CPU only: see visrec.inference); or
        auto, which is onnx on CPU when it exports and agrees with torch, else torch (`backend_note` says why).
        """
        from .checkpoint import load_checkpoint

        if backend not in BACKENDS:
            raise unknown_name("inference backend", backend, BACKENDS, "--backend")
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
                                            str(ckpt.path), fit=Fit.from_state(ckpt.meta.get("input")))
        lm = self._loaded[key]
        if backend == "torch":
            return lm
        okey = (tag, device, "onnx")
        if okey not in self._loaded:
            self._loaded[okey] = self._onnx_model(lm, tag, backend)
        return self._loaded[okey]

    def _onnx_model(self, lm: LoadedModel, tag: str, backend: str) -> LoadedModel:
        """`lm` with its network run by onnxruntime, or (backend auto) `lm` itself with the reason in its note."""
        from .inference import onnx_network

        dev = next(lm.model.parameters()).device
        try:
            if dev.type != "cpu":
                raise VisrecError(f"the onnx backend runs on the CPU, and this model is on {dev}",
                                  "use --device cpu, or --backend torch")
            if self.config.task.name != "classification":
                raise VisrecError(f"the onnx backend is for classification runs, and {self.path} is a "
                                  f"{self.config.task.name} run", "use --backend torch")
            g = torch.Generator().manual_seed(0)
            pixels = torch.randint(0, 256, (3, lm.in_chans, *lm.image_size), generator=g, dtype=torch.uint8)
            example = lm.normalizer(torch.cat([pixels, torch.full_like(pixels[:1], 128)])).float()
            net = onnx_network(copy.deepcopy(lm.model).cpu(), example, self.path / "export" / f"network-{tag}.onnx",
                               source=Path(lm.checkpoint))
        except VisrecError as e:
            if backend == "onnx":
                raise
            return dataclasses.replace(lm, backend_note=f"{e.message} (so it ran on torch)")
        return dataclasses.replace(lm, model=net, backend="onnx")

    def evaluate(self, split: str = "test", *, tta: str | None = None, which: str = "auto",
                 device: str = "auto", data_dir: str | None = None, backend: str = "auto") -> EvalResult:
        """Evaluate on the run's own dataset split (rebuilt from config.yaml with the same seeds); `backend` as in
        load_model."""
        return self.compare_tta([tta], split, which=which, device=device, data_dir=data_dir, backend=backend)[0][1]

    def compare_tta(self, modes: list[str | None] | None = None, split: str = "test", *, which: str = "auto",
                    device: str = "auto", data_dir: str | None = None, backend: str = "auto"
                    ) -> list[tuple[dict[str, Any], EvalResult]]:
        """Evaluate once per test-time augmentation mode (None = the run's own; default: every mode), loading the
        data and model once: [({"tta", "views", "acc", "loss", "seconds"}, EvalResult), ...]."""
        cfg = self.config
        if data_dir:
            cfg.data.data_dir = data_dir
        if split not in ("test", "val", "train"):
            raise VisrecError(f"split {split!r} is not valid", "use test, val or train")
        resolved = [resolve_tta(m or cfg.eval.tta, cfg.data.augment) for m in (modes or TTA_MODES)]
        ds = dataset_from_config(cfg)
        if split == "val" and ds.val is None:
            raise VisrecError(f"{self.path} was trained without a validation split (data.val_fraction=0)")
        lm = self.load_model(which, device, backend)
        data = remap_classes(ds.split(split), lm.classes)
        dev = next(lm.model.parameters()).device
        pad = resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment)
        torch_net = lm.backend == "torch"
        rows = []
        for mode in resolved:
            t0 = time.perf_counter()
            res = evaluate(lm.model, data, lm.normalizer, split=split, batch_size=cfg.eval.batch_size,
                           channels_last=torch_net and use_channels_last(cfg.model.channels_last, lm.model),
                           amp_dtype=resolve_precision(cfg.device.precision, dev) if torch_net else None, tta=mode,
                           crop_pad=pad)
            res.backend = lm.backend
            rows.append(({"tta": mode, "views": len(tta_views(mode, data.images[:1].float())), "acc": res.acc,
                          "loss": res.loss, "seconds": round(time.perf_counter() - t0, 3), "backend": lm.backend},
                         res))
        return rows

    def predict(
        self,
        images: list[Any] | Any,
        *,
        top_k: int = 5,
        resize: bool | None = None,
        convert: bool | None = None,
        tta: str | None = None,
        which: str = "auto",
        device: str = "cpu",
        errors: str = "raise",
        max_pixels: int | None = None,
        backend: str = "auto",
    ) -> list[Prediction]:
        """Top-k classes for image files, PIL images, arrays or uint8 tensors, through the run's own input pipeline.

        Files are decoded as training decoded them. A run trained on an image folder converts every file to its
        channels and fits it to the model's size (the run's evaluation transform: resize to cover, centre crop), so
        `resize` and `convert` default to what training did;
        for other runs an image of another size or a color image for a grayscale model is an error that names
        both fixes, unless `resize` / `convert`. `errors="collect"` predicts the good inputs and returns the bad
        ones with their `error` instead of raising at the first. `backend`: as in load_model.
        """
        if errors not in ("raise", "collect"):
            raise VisrecError(f"errors={errors!r} is not valid", "use raise or collect")
        cfg = self.config
        if cfg.task.name == "style":
            raise VisrecError(f"{self.path} is a style run: it makes images, it does not classify them",
                              f"stylize images with: visrec stylize IMAGE... --model {self.path} (in Python: "
                              "visrec.synthesis.stylize_with_run)")
        if cfg.task.name != "classification":
            raise VisrecError(f"{self.path} is a {cfg.task.name} run: predict gives the classes of classification runs",
                              f"`visrec predict {self.path} IMAGE...` answers for every task (in Python: "
                              "visrec.serve.model.ServedModel); see its test images in "
                              f"{self.path / 'report.html'}, or score it with visrec eval {self.path}")
        resize, convert = self.input_fixes(resize, convert)
        lm = self.load_model(which, device, backend)
        items = images if isinstance(images, list | tuple) else [images]
        batch, names, failed = [], [], {}
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, str | Path) else f"<input {i}>"
            try:
                batch.append(self._to_tensor(item, lm, resize, convert, max_pixels or cfg.data.max_pixels))
                names.append(name)
            except VisrecError as e:
                if errors == "raise":
                    raise
                failed[i] = Prediction(name, [], error=str(e))
        good: list[Prediction] = []
        if batch:
            x = torch.stack(batch)
            cl = lm.backend == "torch" and use_channels_last(cfg.model.channels_last, lm.model)
            tta = resolve_tta(tta or cfg.eval.tta, cfg.data.augment)
            logits = predict_logits(lm.model, x, lm.normalizer, channels_last=cl, tta=tta,
                                    crop_pad=resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment))
            probs = logits.float().softmax(1).cpu()
            k = min(top_k, len(lm.classes))
            p, idx = probs.topk(k, 1)
            good = [Prediction(n, [(lm.classes[j], float(v)) for v, j in zip(pr.tolist(), ix.tolist(), strict=True)])
                    for n, pr, ix in zip(names, p, idx, strict=True)]
        it = iter(good)
        return [failed[i] if i in failed else next(it) for i in range(len(items))]

    def input_fixes(self, resize: bool | None, convert: bool | None) -> tuple[bool, bool]:
        """Whether image files are resized and converted to the model's input; None: as training did (a run trained
        on an image folder converted every file to its channels and fitted it to one size)."""
        cfg = self.config
        folder = cfg.data.name.startswith(("folder:", "wds:"))  # files, each fitted and converted
        return (folder if resize is None else resize,
                folder if convert is None else convert)

    @staticmethod
    def _to_tensor(item: Any, lm: LoadedModel, resize: bool, convert: bool, max_pixels: int | None = None,
                   any_size: bool = False) -> torch.Tensor:
        """An input as the model's uint8 (C, H, W); `any_size` for models that resize it themselves (detectors)."""
        h, w = lm.image_size
        if any_size:
            resize, h, w = False, -1, -1
        if isinstance(item, str | Path):
            path = Path(item)
            check_file(path, lm.in_chans, None if any_size else (h, w), resize, convert, max_pixels)
            if lm.fit is None and h != w and resize:
                raise VisrecError(f"the model takes non-square {w}x{h} images; resize {path} yourself")
            # the run's own evaluation transform (resize to cover, centre crop), or for runs that record none, a square
            a = decode(path, lm.in_chans, (lm.fit or h) if resize else None)
            return torch.from_numpy(a).permute(2, 0, 1).contiguous()
        if hasattr(item, "mode") and hasattr(item, "size"):  # a PIL image
            item = np.asarray(item)
        t = torch.as_tensor(np.asarray(item)) if not isinstance(item, torch.Tensor) else item
        if t.dim() == 2:
            t = t[None]
        elif t.dim() == 3 and t.shape[-1] in (1, 3) and t.shape[0] not in (1, 3):
            t = t.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        if t.dtype != torch.uint8 or t.dim() != 3:
            raise VisrecError(f"input of dtype {t.dtype} and shape {tuple(t.shape)} is not a uint8 image",
                              "give (H, W), (H, W, C) or (C, H, W) uint8 arrays, or image files")
        if t.shape[0] != lm.in_chans:
            raise VisrecError(f"input has {t.shape[0]} channels but the model takes {lm.in_chans}")
        if tuple(t.shape[1:]) != (h, w) and not any_size:
            raise VisrecError(f"input is {t.shape[2]}x{t.shape[1]} but the model takes {w}x{h}")
        return t

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
    def run(self) -> Run:
        return Run(self.path)

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


def list_runs(root: str | Path = "runs") -> list[Run]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [Run(p) for p in sorted(root.iterdir()) if (p / "config.yaml").is_file()]
