"""The run API: a run folder (`visrec.run_store.RunFolder`) with what it answers, asked of the run's own task:
`evaluate` (classification's test-time augmentation table) and `predict` (every task's `Predictor`).

    from visrec import Run
    run = Run("runs/scenes-resnet8-20260101-120000")
    run.predict(["cat.jpg"])[0].top          # [("cat", 0.93), ...]
    run.predictor(backend="onnx")            # the task's Predictor, loaded once, for many calls
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .device import resolve_precision
from .errors import VisrecError
from .evaluate import TTA_MODES, EvalResult, evaluate, resolve_crop_pad, resolve_tta, tta_views
from .prediction import Prediction, Predictor
from .run_store import (
    LoadedModel,
    RunFolder,
    RunRef,
    check_file,
    dataset_from_config,
    default_run_name,
    expand_refs,
    remap_classes,
    run_label,
    setup_config,
)


class Run(RunFolder):
    """A run folder: its config, metrics, summary and checkpoints, with evaluate() and predict()."""

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
        lm = self.load_model(which, device, backend, outputs="tensor")
        data = remap_classes(ds.split(split), lm.classes)
        dev = next(lm.model.parameters()).device
        pad = resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment)
        torch_net = lm.backend in ("torch", "channels_last")
        rows = []
        for mode in resolved:
            t0 = time.perf_counter()
            res = evaluate(lm.model, data, lm.normalizer, split=split, batch_size=cfg.eval.batch_size,
                           channels_last=lm.channels_last,
                           amp_dtype=resolve_precision(cfg.device.precision, dev) if torch_net else None, tta=mode,
                           crop_pad=pad)
            res.backend = lm.backend
            rows.append(({"tta": mode, "views": len(tta_views(mode, data.images[:1].float())), "acc": res.acc,
                          "loss": res.loss, "seconds": round(time.perf_counter() - t0, 3), "backend": lm.backend},
                         res))
        return rows

    def predictor(self, *, which: str = "auto", device: str = "cpu", backend: str = "auto", **options: Any
                  ) -> Predictor:
        """The run's task's Predictor, loaded once: `predictor([predictor.load(x)])` answers, `predictor.predict`
        takes files, arrays and PIL images. `options`: tta, resize, convert, max_pixels and the task's own settings
        (a detector's min_score, a captioner's beam)."""
        from .tasks import create_task

        task = create_task(self.config.task.name, self.config)
        return task.predictor(self, which=which, device=device, backend=backend, **options)

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
        **settings: Any,
    ) -> list[Prediction]:
        """Predictions for image files, PIL images, arrays or uint8 tensors, through the run's own input pipeline and
        its task's answer: `top` classes (classification, localization), and every task's `answer` (boxes, masks,
        objects, captions, stylized images), whose `to_json()` is what `visrec predict --format json` prints.

        Files are decoded as training decoded them. A run trained on an image folder converts every file to its
        channels and fits it to the model's size (the run's evaluation transform: resize to cover, centre crop), so
        `resize` and `convert` default to what training did;
        for other runs an image of another size or a color image for a grayscale model is an error that names
        both fixes, unless `resize` / `convert`. `errors="collect"` predicts the good inputs and returns the bad
        ones with their `error` instead of raising at the first. `backend`: as in load_model. `settings`: the task's
        own (min_score for detectors, beam for captioning).
        """
        p = self.predictor(which=which, device=device, backend=backend, tta=tta, resize=resize, convert=convert,
                           max_pixels=max_pixels, **settings)
        items = images if isinstance(images, list | tuple) else [images]
        return p.predict(list(items), top_k=top_k, errors=errors)


def list_runs(root: str | Path = "runs") -> list[Run]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [Run(p) for p in sorted(root.iterdir()) if (p / "config.yaml").is_file()]


__all__ = ["LoadedModel", "Prediction", "Run", "RunRef", "check_file", "dataset_from_config", "default_run_name",
           "expand_refs", "list_runs", "remap_classes", "run_label", "setup_config"]
