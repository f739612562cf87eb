"""One run as the server holds it: bytes in, checked and decoded like training decoded its images, answers out.

`ServedModel.prepare` turns an upload into the model's input (it runs in a thread of the server's pool, never on
the event loop); `ServedModel.infer` runs a batch of prepared inputs through the model (only the batching worker
that owns the model calls it). Every task a run folder can hold answers in its own shape:

- classification: the top-k classes with probabilities;
- localization: the top-k classes and the box of the best one, in the upload's own pixels;
- detection / instance: the objects (class, box, score), instance masks as COCO RLE, plus a PNG overlay;
- segmentation: each class's share of the pixels, plus the class map as a PNG overlay.

Uploads are recognized by their magic bytes, never by the name or the declared type, and their header is read
before any pixel is decoded, so an image that claims more than `max_pixels` pixels is refused unread.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..data.images import MAX_PIXELS, open_checked, to_array
from ..errors import VisrecError
from ..evaluate import mean_probability_log

# magic bytes -> format: what Pillow decodes and visrec accepts
MAGIC: list[tuple[bytes, int, str]] = [
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),  # after RIFF....
]
NETPBM = (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6")
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM/PGM/PBM")


class NotSmall(Exception):  # noqa: N818 - a signal, not an error: "decode this one off the event loop"
    pass


class UploadError(VisrecError):
    """An upload the server refuses: `kind` names the error in responses and metrics, `status` its HTTP code."""

    def __init__(self, kind: str, status: int, message: str, hint: str = ""):
        super().__init__(message, hint)
        self.kind, self.status, self.detail = kind, status, message


def sniff(data: bytes) -> str | None:
    """The image format of `data` from its first bytes, or None."""
    for magic, offset, fmt in MAGIC:
        if data[offset:offset + len(magic)] == magic and (fmt != "WEBP" or data[:4] == b"RIFF"):
            return fmt
    if data[:2] in NETPBM and data[2:3] in (b" ", b"\n", b"\r", b"\t"):
        return "PPM/PGM/PBM"
    return None


def png_data_uri(rgba: np.ndarray) -> str:
    """An (H, W, 3|4) uint8 array as a data:image/png;base64 URI."""
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def palette(n: int) -> np.ndarray:
    """n distinct RGB colors (uint8), the same for every request: class k is always the same color."""
    import colorsys

    golden = 0.618033988749895
    return np.array([[round(c * 255) for c in colorsys.hsv_to_rgb((k * golden) % 1.0, 0.75, 0.95)]
                     for k in range(n)], dtype=np.uint8)


def heat_rgba(cam: torch.Tensor) -> np.ndarray:
    """A (H, W) attribution map -> an RGBA heat map (jet-like colors, opacity rising with the value)."""
    c = cam.float()
    c = (c - c.min()) / (c.max() - c.min()).clamp_min(1e-12)
    v = c.numpy()
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    a = np.clip(0.15 + 0.75 * v, 0, 1)
    return (np.stack([r, g, b, a], -1) * 255).round().astype(np.uint8)


@dataclass
class Prepared:
    """One decoded upload: the model's uint8 input (C, H, W) and the upload's own size."""

    name: str
    x: torch.Tensor
    width: int
    height: int
    fmt: str


class Backend:
    """How a batch of uint8 images becomes the network's raw outputs."""

    name = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, lm, tta: str, crop_pad: int, channels_last: bool):
        self.lm, self.tta, self.crop_pad, self.channels_last = lm, tta, crop_pad, channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from ..evaluate import predict_logits

        return predict_logits(self.lm.model, x, self.lm.normalizer, batch_size=max(1, len(x)),
                              channels_last=self.channels_last, tta=self.tta, crop_pad=self.crop_pad).cpu()


class OnnxBackend(Backend):
    """The run's ONNX export (preprocessing built in) through onnxruntime. Test-time flips are applied here, in
    pixel space, which equals flipping the normalized input; crops and scales are torch-only."""

    name = "onnx"

    def __init__(self, path: Path, tta: str, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise VisrecError("--backend onnx needs onnxruntime", "pip install onnxruntime, or use --backend torch"
                              ) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # idle pool threads sleep instead of spinning: the event loop needs those cores between batches
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path, self.tta = path, tta

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"pixels": np.ascontiguousarray(x.float().numpy())})[0]
        return torch.from_numpy(out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta == "none":
            return self._run(x)
        return mean_probability_log([self._run(x), self._run(x.flip(-1))])


def onnx_export_for(run, which: str) -> Path:
    """The run's ONNX export for checkpoint `which`, written into RUN/export/ unless one of the same checkpoint is
    already there."""
    from ..export import export_run, read_export_metadata

    lm = run.load_model(which, "cpu")
    tag = Path(lm.checkpoint).stem
    path = run.path / "export" / f"model-{tag}.onnx"
    if path.is_file():
        try:
            meta = read_export_metadata(path)
            if meta.get("checkpoint") == lm.checkpoint and path.stat().st_mtime >= Path(lm.checkpoint).stat().st_mtime:
                return path
        except Exception:  # noqa: BLE001 - an unreadable old export is simply written again
            pass
    return export_run(run.path, "onnx", out=path, which=which)


class ServedModel:
    """A run folder loaded for serving: `prepare` an upload, `infer` a batch, `explain` with Grad-CAM."""

    TASKS = ("classification", "localization", "segmentation", "detection", "instance", "captioning")

    def __init__(self, run_path: str | Path, *, backend: str = "torch", which: str = "auto", tta: str | None = None,
                 max_pixels: int | None = None, min_score: float = 0.5, threads: int | None = None,
                 beam: int | None = None):
        from ..runs import Run

        self.run = Run(run_path)
        cfg = self.run.config
        self.task = cfg.task.name
        if self.task not in self.TASKS:
            raise VisrecError(f"{self.run.path} is a {self.task} run, which the server cannot answer for yet",
                              f"serve runs of these tasks: {', '.join(self.TASKS)}")
        if backend not in ("torch", "onnx"):
            raise VisrecError(f"--backend {backend} is not valid", "use torch or onnx")
        self.detector = self.task in ("detection", "instance")
        self.beam = cfg.task.beam if beam is None else beam
        if self.beam < 1:
            raise VisrecError(f"--beam {self.beam} is not valid", "use 1 (greedy) or more")
        if backend == "onnx" and self.task == "captioning":
            raise VisrecError(f"{self.run.path} is a captioning run: its decoder loops in Python, with no ONNX "
                              "export here", "serve it with --backend torch")
        if backend == "onnx" and self.detector:
            raise VisrecError(f"{self.run.path} is a {self.task} run: its torchvision detector has no ONNX export "
                              "here", "serve it with --backend torch")
        self.name = self.run.name
        self.backend_name, self.which, self.min_score = backend, which, min_score
        self.max_pixels = max_pixels or cfg.data.max_pixels or MAX_PIXELS
        self.threads = threads or torch.get_num_threads()
        self._tta_request = tta
        self.lock = threading.Lock()  # the server's worker owns the model; library callers may share it across threads
        self.ready = False

    # ---------------------------------------------------------------- loading (in the loader thread)

    def load(self) -> ServedModel:
        from ..device import use_channels_last
        from ..evaluate import resolve_crop_pad, resolve_tta

        cfg = self.run.config
        self.lm = self.run.load_model(self.which, "cpu")
        self.classes = list(self.lm.classes)
        self.channels = self.lm.in_chans
        self.size = tuple(self.lm.image_size)
        tta = "none" if self.task != "classification" else resolve_tta(self._tta_request or cfg.eval.tta,
                                                                        cfg.data.augment)
        if self.backend_name == "onnx" and tta not in ("none", "flip"):
            raise VisrecError(f"--backend onnx applies test-time flips only, and this run's tta is {tta}",
                              "pass --tta none or --tta flip, or use --backend torch")
        self.tta = tta
        cl = use_channels_last(cfg.model.channels_last, self.lm.model)
        if self.backend_name == "onnx":
            self.backend: Backend = OnnxBackend(onnx_export_for(self.run, self.which), tta, self.threads)
        else:
            self.backend = TorchBackend(self.lm, tta, resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment),
                                        cl)
        if self.task == "localization":
            from ..tasks import create_task

            self._loc = create_task("localization", cfg)
            self._loc.num_classes = len(self.classes)
        self.seg_classes = ["(background)", *self.classes] if self.task == "segmentation" else None
        self.colors = palette(len(self.classes) + 1)
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
                    "resize": "kept at its own size (the detector resizes it)" if self.detector
                    else f"bilinear, {self.lm.fit.describe()}" if self.lm.fit is not None
                    else f"bilinear to {self.size[1]}x{self.size[0]} (width x height)",
                    "normalize": _normalize_card(norm),
                    "tta": self.tta},
                "max_pixels": self.max_pixels, "explain": ["gradcam"] if self.explainable else []})
        return out

    @property
    def explainable(self) -> bool:
        return self.task in ("classification", "localization")

    # ---------------------------------------------------------------- per upload (in the thread pool)

    def prepare(self, data: bytes, name: str, inline_pixels: int | None = None) -> Prepared:
        """Check and decode one upload, opened once: magic bytes, then the header (a bomb is refused unread), then the
        pixels. Raises UploadError (400 unreadable / unsupported, 413 too many pixels), or NotSmall when the header
        claims more than `inline_pixels` (the caller decodes it elsewhere)."""
        fmt = sniff(data)
        if fmt is None:
            what = "text" if _looks_like_text(data) else "unknown bytes"
            raise UploadError("unsupported_image", 400, f"{name} is not an image the server reads: its content is "
                              f"{what}, not {', '.join(FORMATS)} (recognized by their first bytes, whatever the file "
                              "name or Content-Type says)", "send a PNG, JPEG, GIF, BMP, TIFF, WebP or PPM file")
        try:
            with open_checked(io.BytesIO(data), self.max_pixels, "--max-pixels N when starting the server",
                              name) as im:
                if inline_pixels is not None and im.size[0] * im.size[1] > inline_pixels:
                    raise NotSmall
                try:
                    im = ImageOps.exif_transpose(im)  # a photo taken upright is upright: boxes and masks follow
                    w, h = im.size
                    # the run's evaluation transform (resize to cover, centre crop), else squashed to its size
                    size = None if self.detector else self.lm.fit or (self.size[1], self.size[0])
                    a = to_array(im, self.channels, size, oriented=True)
                except (OSError, ValueError) as e:
                    raise UploadError("unreadable_image", 400, f"{name}: the {fmt} image cannot be decoded: {e}",
                                      "the file is truncated or damaged; send it again or re-save it") from None
        except UploadError:
            raise
        except VisrecError as e:
            if "claims" in e.message:
                raise UploadError("too_many_pixels", 413, e.message.split(" (a decompression")[0]
                                  + f": refused before decoding (the server's limit is {self.max_pixels:,} pixels)",
                                  "downscale the image before sending it") from None
            raise UploadError("unreadable_image", 400, f"{name}: the {fmt} header cannot be read ({e.message})",
                              "the file is damaged or not what its first bytes say; send it again or re-save it"
                              ) from None
        return Prepared(name, torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous(), w, h, fmt)

    # ---------------------------------------------------------------- per batch (in the worker that owns the model)

    def infer(self, items: list[Prepared], top_k: int | list[int] = 5) -> list[dict[str, Any]]:
        """Answers for prepared inputs, one dict per input, in order. `top_k` may differ per input."""
        ks = top_k if isinstance(top_k, list) else [top_k] * len(items)
        with self.lock:
            if self.detector:
                return self._objects(items)
            if self.task == "captioning":
                return self._captions(items)
            out = self.backend(torch.stack([p.x for p in items]))
            if self.task == "segmentation":
                return self._segments(items, out)
            if self.task == "localization":
                logits, boxes = self._loc.split_outputs(out.float())
                res = self._top(logits, ks)
                for r, p, b in zip(res, items, boxes, strict=True):
                    fw, fh = self._upload_scale(p)
                    r["box"] = [round(float(v), 2) for v in (b.clamp(0, 1) * torch.tensor([fw, fh, fw, fh])).tolist()]
                return res
            return self._top(out, ks)

    def _top(self, logits: torch.Tensor, ks: list[int]) -> list[dict[str, Any]]:
        probs = logits.float().softmax(1)
        kmax = min(max(ks), len(self.classes))
        p, idx = probs.topk(kmax, 1)
        return [{"top": [{"class": self.classes[j], "prob": round(float(v), 6)}
                         for v, j in zip(pr[:k].tolist(), ix[:k].tolist(), strict=True)]}
                for pr, ix, k in zip(p, idx, ks, strict=True)]

    def _captions(self, items: list[Prepared]) -> list[dict[str, Any]]:
        """Each image's caption; attention models add, per word, its weights over the feature map (rows of the
        encoder's grid, 3 decimals)."""
        lm = self.lm
        x = lm.normalizer(torch.stack([p.x for p in items]).to(next(lm.model.parameters()).device))
        tokens, alphas = lm.model.generate(x, beam=self.beam)
        res = []
        for i, t in enumerate(tokens):
            text = lm.model.decode(t)
            r: dict[str, Any] = {"caption": text}
            if alphas is not None:
                gh, gw = lm.model.grid
                words = text.split()
                r["attention"] = [{"word": w, "weights": [[round(float(v), 3) for v in row] for row in
                                                          alphas[i, j].view(gh, gw).tolist()]}
                                  for j, w in enumerate(words)]
            res.append(r)
        return res

    def _upload_scale(self, p: Prepared) -> tuple[float, float]:
        """The upload's (width, height) per unit of the model's input: the upload's size, unless the run letterboxed
        its images (then the whole input is larger than the upload's part of it)."""
        fit = self.lm.fit
        if fit is None or fit.mode != "pad":
            return float(p.width), float(p.height)
        ch, cw = fit.content(p.width, p.height)
        return fit.width * p.width / cw, fit.height * p.height / ch

    def _segments(self, items: list[Prepared], out: torch.Tensor) -> list[dict[str, Any]]:
        res = []
        names = self.seg_classes or []
        for p, logits in zip(items, out.float(), strict=True):
            fw, fh = self._upload_scale(p)  # a letterbox: only its image part is the upload
            rh = max(1, round(logits.shape[-2] * p.height / fh))
            rw = max(1, round(logits.shape[-1] * p.width / fw))
            up = F.interpolate(logits[None, :, :rh, :rw], size=(p.height, p.width), mode="bilinear",
                               align_corners=False)[0]
            cls = up.argmax(0)
            counts = torch.bincount(cls.flatten(), minlength=len(names)).tolist()
            total = max(1, p.height * p.width)
            rgba = np.zeros((p.height, p.width, 4), dtype=np.uint8)
            c = cls.numpy()
            rgba[..., :3] = self.colors[c]
            rgba[..., 3] = np.where(c > 0, 150, 0)
            res.append({"pixels": {names[k]: round(n / total, 6) for k, n in enumerate(counts) if n},
                        "legend": {names[k]: _hex(self.colors[k]) for k in range(1, len(names))},
                        "mask": png_data_uri(rgba)})
        return res

    def _objects(self, items: list[Prepared]) -> list[dict[str, Any]]:
        from ..tasks.detection import _rle, detect, object_classes

        classes = object_classes(self.classes)
        res = []
        for p in items:  # images keep their own sizes: one forward each (the detector batches internally anyway)
            d = detect(self.lm.model, p.x[None], self.lm.normalizer)[0]
            keep = (d["scores"] >= self.min_score).nonzero()[:, 0].tolist()
            objs, masks = [], []
            for j in keep:
                o = {"class": classes[int(d["labels"][j])], "box": [round(v, 2) for v in d["boxes"][j].tolist()],
                     "score": round(float(d["scores"][j]), 4), "color": _hex(self.colors[int(d["labels"][j]) + 1])}
                if "masks" in d:
                    m = (d["masks"][j, 0] > 0.5).numpy()
                    o["mask"] = _rle(m)
                    masks.append((m, int(d["labels"][j]) + 1))
                objs.append(o)
            r: dict[str, Any] = {"objects": objs}
            if masks:
                rgba = np.zeros((p.height, p.width, 4), dtype=np.uint8)
                for m, k in masks:
                    rgba[m, :3] = self.colors[k]
                    rgba[m, 3] = 150
                r["mask"] = png_data_uri(rgba)
            res.append(r)
        return res

    def explain(self, items: list[Prepared], targets: list[int] | None = None) -> list[str]:
        """Grad-CAM heat maps (PNG data URIs, the model's input size) for the top class, or `targets`."""
        from ..explain.methods import attribute

        if not self.explainable:
            raise VisrecError(f"explain=gradcam is for classification and localization runs; {self.name} is a "
                              f"{self.task} run")
        with self.lock:
            lm = self.lm
            x = lm.normalizer(torch.stack([p.x for p in items]).to(next(lm.model.parameters()).device))
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


def _hex(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb[:3])


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(head) and not any(b < 9 for b in head)


__all__ = ["FORMATS", "OnnxBackend", "Prepared", "ServedModel", "TorchBackend", "UploadError", "sniff"]
