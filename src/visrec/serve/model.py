"""One run as the server holds it: bytes in, checked and decoded like training decoded its images, answers out,
all through the run's task's `Predictor` (visrec.prediction), the same one `visrec predict` and `Run.predict` use.

`ServedModel.prepare` turns an upload into the model's input (it runs in a thread of the server's pool, never on
the event loop); `ServedModel.infer` runs a batch of prepared inputs through the predictor (only the batching worker
that owns the model calls it). Every task answers in its own shape (its Answer's JSON form): the top-k classes;
a box; each class's share of the pixels with the class map as a PNG overlay; the objects with COCO RLE masks; a
caption with its attention; a stylized image.

Uploads are recognized by their magic bytes, never by the name or the declared type, and their header is read
before any pixel is decoded, so an image that claims more than `max_pixels` pixels is refused unread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.images import MAX_PIXELS
from ..errors import VisrecError
from ..inference import check_backend
from ..prediction import FORMATS, NotSmall, Prepared, UploadError, heat_rgba, png_data_uri, sniff


class ServedModel:
    """A run folder loaded for serving: `prepare` an upload, `infer` a batch, `explain` with Grad-CAM."""

    def __init__(self, run_path: str | Path, *, backend: str = "torch", which: str = "auto", tta: str | None = None,
                 max_pixels: int | None = None, min_score: float = 0.5, threads: int | None = None,
                 beam: int | None = None):
        from ..runs import Run
        from ..tasks import task_class

        self.run = Run(run_path)
        cfg = self.run.config
        self.task = cfg.task.name
        self.kind = task_class(self.task)
        if self.kind.Predictor is None:
            raise VisrecError(f"{self.run.path} is a {self.task} run, which the server cannot answer for",
                              self.kind.predict_hint.format(run=self.run.path) or "serve a run whose task predicts")
        check_backend(backend, self.kind.Predictor.outputs, f"{self.run.path} (a run of task {self.task})")
        settings = self.kind.Predictor.settings
        self.settings = {k: v for k, v in {"min_score": min_score, "beam": beam}.items() if k in settings}
        self.name = self.run.name
        self.backend_name, self.which = backend, which
        self.max_pixels = max_pixels or cfg.data.max_pixels or MAX_PIXELS
        self.threads = threads or torch.get_num_threads()  # the torch threads of the process (onnxruntime: as many)
        self._tta_request = tta
        self.ready = False

    # ---------------------------------------------------------------- loading (in the loader thread)

    def load(self) -> ServedModel:
        self.predictor = p = self.run.predictor(which=self.which, backend=self.backend_name, tta=self._tta_request,
                                                max_pixels=self.max_pixels, resize=True, convert=True,
                                                **self.settings)
        self.lm = p.lm
        self.classes, self.channels, self.size = p.classes, p.channels, p.size
        self.tta = p.tta_mode
        # warm up: the first call allocates and plans; no user request should pay for it
        self.infer([Prepared("warm-up", torch.zeros(self.channels, *self.size, dtype=torch.uint8), self.size[1],
                             self.size[0], "PNG")], top_k=1)
        self.ready = True
        return self

    def card(self) -> dict[str, Any]:
        """What GET /v1/models says about this run."""
        cfg = self.run.config
        s = self.run.summary
        tests = {k[5:]: v for k, v in s.items() if k.startswith("test_") and isinstance(v, int | float)}
        out: dict[str, Any] = {"name": self.name, "task": self.task, "ready": self.ready, "backend": self.backend_name,
                               "model": cfg.model.name, "dataset": cfg.data.name, "status": s.get("status"),
                               "test_metrics": tests, "primary_metric": s.get("primary_metric")}
        if self.ready:
            norm = self.lm.normalizer.state()
            out.update({
                "classes": self.classes, "input": {"channels": self.channels, "height": self.size[0],
                                                   "width": self.size[1]},
                "preprocessing": {
                    "decode": "EXIF orientation applied, transparency composited on white, "
                              + ("converted to grayscale" if self.channels == 1 else "converted to RGB"),
                    **self.predictor.describe(), "normalize": _normalize_card(norm)},
                "max_pixels": self.max_pixels, "explain": list(self.explanations)})
        return out

    @property
    def explanations(self) -> tuple[str, ...]:
        """The attribution methods this run offers (its task's, through a backend gradients flow through)."""
        from ..inference import BACKENDS

        grads = self.backend_name not in BACKENDS or BACKENDS[self.backend_name].gradients
        return self.kind.Predictor.explanations if grads else ()

    @property
    def explainable(self) -> bool:
        return bool(self.explanations)

    # ---------------------------------------------------------------- per upload (in the thread pool)

    def prepare(self, data: bytes, name: str, inline_pixels: int | None = None) -> Prepared:
        """Check and decode one upload, opened once (see Predictor.prepare)."""
        return self.predictor.prepare(data, name, inline_pixels)

    # ---------------------------------------------------------------- per batch (in the worker that owns the model)

    def infer(self, items: list[Prepared], top_k: int | list[int] = 5) -> list[dict[str, Any]]:
        """Answers for prepared inputs, one dict per input (its Answer's JSON form), in order; `top_k` may differ per
        input."""
        return [a.to_json() for a in self.predictor(items, top_k)]

    def explain(self, items: list[Prepared], targets: list[int] | None = None) -> list[str]:
        """Grad-CAM heat maps (PNG data URIs, the model's input size) for the top class, or `targets`."""
        from ..explain.methods import attribute

        if "gradcam" not in self.kind.Predictor.explanations:
            raise VisrecError(f"explain=gradcam is not offered for {self.name}: {self.task} runs explain with "
                              f"{', '.join(self.kind.Predictor.explanations) or 'no attribution method'}",
                              "leave out explain")
        if "gradcam" not in self.explanations:
            raise VisrecError(f"explain=gradcam is not offered for {self.name} on the {self.backend_name} backend "
                              "(no gradients flow through it)", "leave out explain, or serve it with --backend torch")
        p = self.predictor
        with p.lock:
            lm = self.lm
            x = lm.normalizer(torch.stack([i.x for i in items]).to(p.device))
            if targets is None:
                with torch.no_grad():
                    logits = lm.model(x)[:, :len(self.classes)]
                targets = logits.argmax(1).tolist()
            with torch.enable_grad():
                cams = attribute("gradcam", lm.model, x, torch.tensor(targets, device=x.device))
        return [png_data_uri(heat_rgba(c.cpu())) for c in cams]


def _normalize_card(norm: dict[str, Any]) -> dict[str, Any]:
    if "mean" not in norm:  # a whitening basis: its facts, not its numbers
        return {**norm, "input_range": "pixel values 0..255"}
    return {"mode": norm["mode"], "mean": _stat(norm["mean"]), "std": _stat(norm["std"]),
            "input_range": "pixel values 0..255"}


def _stat(values: list[float]) -> list[float] | str:
    return [round(float(v), 4) for v in values] if len(values) <= 4 else "per pixel (the training mean image)"


__all__ = ["FORMATS", "NotSmall", "Prepared", "ServedModel", "UploadError", "sniff"]
