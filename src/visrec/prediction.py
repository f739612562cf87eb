"""What a trained run answers, one way for every caller: the library (`Run.predict`), `visrec predict`,
`visrec serve` and the report's examples all go through the run task's `Predictor`.

A predictor is made once per loaded run (`Task.predictor(run, ...)`). It

1. prepares inputs by the run's own rules: image files, upload bytes (recognized by their magic bytes, their header
   read before any pixel, so a decompression bomb is refused unread), PIL images, arrays or uint8 tensors become the
   model's uint8 (C, H, W), converted and fitted as training fitted its images (`Prepared`);
2. runs a backend of `visrec.inference.BACKENDS` (the predictor says which outputs it reads: `tensor` or
   `structured`, and whether the task's test-time augmentation applies);
3. turns the raw outputs into the task's `Answer`: a typed result with a JSON form (`to_json`), a line of text
   (`text`) and, where the task has one, a drawing (`draw`, a PNG).

    p = task.predictor(run, which="best", backend="auto")
    answers = p([p.load("cat.jpg")], top_k=3)
    answers[0].to_json()        # {"top": [{"class": "cat", "prob": 0.93}, ...]}
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps

from .data.images import MAX_PIXELS, open_checked, to_array
from .errors import VisrecError
from .evaluate import predict_logits, resolve_crop_pad, resolve_tta
from .run_store import RunFolder, check_file

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
    """An input refused: `kind` names the error in responses and metrics, `status` its HTTP code."""

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


def png_bytes(rgb: np.ndarray) -> bytes:
    """An (H, W, 1|3|4) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0] if rgb.ndim == 3 and rgb.shape[2] == 1 else rgb).save(buf, format="PNG",
                                                                                        optimize=False)
    return buf.getvalue()


def png_data_uri(rgba: np.ndarray) -> str:
    """An (H, W, 3|4) uint8 array as a data:image/png;base64 URI."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgba)).decode("ascii")


def palette(n: int) -> np.ndarray:
    """n distinct RGB colors (uint8), the same for every request: class k is always the same color."""
    import colorsys

    golden = 0.618033988749895
    return np.array([[round(c * 255) for c in colorsys.hsv_to_rgb((k * golden) % 1.0, 0.75, 0.95)]
                     for k in range(n)], dtype=np.uint8)


def hex_color(rgb: np.ndarray) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb[:3])


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
    """One input, ready: the model's uint8 input (C, H, W), the input's own (upright) size, and its bytes when it
    came from a file or an upload (drawings are made on the original)."""

    name: str
    x: torch.Tensor
    width: int
    height: int
    fmt: str = ""
    data: bytes | None = field(default=None, repr=False)

    def original(self) -> Image.Image:
        """The input as an upright RGB image at its own size."""
        if self.data is not None:
            return ImageOps.exif_transpose(Image.open(io.BytesIO(self.data))).convert("RGB")
        a = self.x.permute(1, 2, 0).numpy()
        return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).convert("RGB")


class Answer:
    """One input's answer: a typed result with a JSON form, a line of text and, where the task has one, a drawing."""

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.to_json().items())

    def draw(self, item: Prepared) -> bytes | None:
        """The input with the answer drawn on it, as PNG bytes (None: the task draws nothing)."""
        return None


@dataclass
class ClassScores(Answer):
    """The most likely classes, with probabilities, best first."""

    top: list[tuple[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {"top": [{"class": c, "prob": round(float(p), 6)} for c, p in self.top]}

    def text(self) -> str:
        return ", ".join(f"{c} {p:.1%}" for c, p in self.top)


@dataclass
class Prediction:
    """One input's prediction as the library returns it: the task's `answer` (its `top` classes too, for tasks that
    score classes), or the `error` that kept it from being predicted (errors="collect")."""

    source: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    error: str | None = None
    answer: Answer | None = None
    width: int = 0
    height: int = 0
    item: Prepared | None = field(default=None, repr=False)  # the prepared input (drawings are made on it)

    @property
    def label(self) -> str:
        return self.top[0][0]

    def to_json(self) -> dict[str, Any]:
        """The JSON form `visrec predict --format json` prints and `visrec serve` answers with."""
        if self.error is not None:
            return {"image": self.source, "error": self.error}
        return {"image": self.source, "width": self.width, "height": self.height,
                **(self.answer.to_json() if self.answer is not None else {})}

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Prediction({self.source}: error {self.error})"
        return f"Prediction({self.source}: {self.answer.text() if self.answer is not None else ''})"


class Predictor:
    """A loaded run answering for inputs. Subclass per task (`Task.Predictor`) and write `answer`.

    Declared by the subclass: `outputs` (what it reads from the network: `tensor`, or `structured` for dicts and
    decoding loops, which only eager backends give); `any_size` (the network takes each input at its own size);
    `tta` (the run's test-time augmentation applies); `settings` (options fixed when the predictor is made, with
    their defaults, e.g. a detector's `min_score`); `formats` (what `visrec predict --format` may write);
    `explanations` (attribution methods the server's explain= may ask, through an eager backend); `draws` (answers
    have a drawing)."""

    outputs: ClassVar[str] = "tensor"
    any_size: ClassVar[bool] = False
    tta: ClassVar[bool] = False
    settings: ClassVar[dict[str, Any]] = {}
    formats: ClassVar[tuple[str, ...]] = ("text", "json")
    explanations: ClassVar[tuple[str, ...]] = ()
    draws: ClassVar[bool] = False
    makes_images: ClassVar[bool] = False  # its answer is an image made from the input (style transfer)

    def __init__(self, task: Any, run: RunFolder, *, which: str = "auto", device: str = "cpu",
                 backend: str = "auto", tta: str | None = None, resize: bool | None = None,
                 convert: bool | None = None, max_pixels: int | None = None, **settings: Any):
        unknown = [k for k, v in settings.items() if v is not None and k not in self.settings]
        if unknown:
            allowed = ", ".join(f"--{k.replace('_', '-')}" for k in self.settings) or "none"
            raise VisrecError(f"--{unknown[0].replace('_', '-')} is not an option of a {task.name} run's predictions",
                              f"leave it out (the options of {task.name} predictions: {allowed})")
        self.task, self.run = task, run
        cfg = self.cfg = run.config
        self.options = {**self.settings, **{k: v for k, v in settings.items() if v is not None}}
        self.lm = run.load_model(which, device, backend, outputs=self.outputs)
        self.backend, self.backend_note = self.lm.backend, self.lm.backend_note
        self.classes = list(self.lm.classes)
        self.channels = self.lm.in_chans
        self.size = tuple(self.lm.image_size)
        self.fit = self.lm.fit
        self.resize, self.convert = run.input_fixes(resize, convert)
        self.max_pixels = max_pixels or cfg.data.max_pixels or MAX_PIXELS
        self.tta_mode = resolve_tta(tta or cfg.eval.tta, cfg.data.augment) if self.tta else "none"
        self.crop_pad = resolve_crop_pad(cfg.eval.crop_pad, cfg.data.augment)
        self.colors = palette(len(self.classes) + 1)
        self.lock = threading.Lock()  # one forward at a time: the server's worker and library threads may share it
        self.setup()

    def setup(self) -> None:
        """Check the settings and build what answers need (called at the end of __init__)."""

    @property
    def device(self) -> torch.device:
        return next(self.lm.model.parameters()).device

    # ---------------------------------------------------------------- inputs

    def load(self, item: Any, name: str | None = None) -> Prepared:
        """An image file (checked by the run's rules: a file that is not the model's input is refused unless the
        run's resize/convert allow the change), upload bytes, a PIL image, an array or a uint8 tensor, prepared."""
        if isinstance(item, str | Path):
            path = Path(item)
            check_file(path, self.channels, None if self.any_size else self.size, self.resize or self.any_size,
                       self.convert, self.max_pixels)
            return self.prepare(path.read_bytes(), name or str(path), what="file")
        if isinstance(item, bytes | bytearray):
            return self.prepare(bytes(item), name or "<bytes>")
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
        if t.shape[0] != self.channels:
            raise VisrecError(f"input has {t.shape[0]} channels but the model takes {self.channels}")
        h, w = self.size
        if tuple(t.shape[1:]) != (h, w) and not self.any_size:
            raise VisrecError(f"input is {t.shape[2]}x{t.shape[1]} but the model takes {w}x{h}")
        t = t.contiguous()
        return Prepared(name or "<input>", t, int(t.shape[2]), int(t.shape[1]))

    def prepare(self, data: bytes, name: str, inline_pixels: int | None = None, what: str = "upload") -> Prepared:
        """Check and decode image bytes, opened once: magic bytes, then the header (a bomb is refused unread), then
        the pixels, fitted as the run fits its images. Raises UploadError (400 unreadable / unsupported, 413 too many
        pixels), or NotSmall when the header claims more than `inline_pixels` (the caller decodes it elsewhere)."""
        fmt = sniff(data)
        if fmt is None:
            what_it_is = "text" if _looks_like_text(data) else "unknown bytes"
            raise UploadError("unsupported_image", 400, f"{name} is not an image visrec reads: its content is "
                              f"{what_it_is}, not {', '.join(FORMATS)} (recognized by their first bytes, whatever the "
                              "name or Content-Type says)", "send a PNG, JPEG, GIF, BMP, TIFF, WebP or PPM file")
        limit = "--max-pixels N" + (" when starting the server" if what == "upload" else "")
        try:
            with open_checked(io.BytesIO(data), self.max_pixels, limit, name) as im:
                if inline_pixels is not None and im.size[0] * im.size[1] > inline_pixels:
                    raise NotSmall
                try:
                    im = ImageOps.exif_transpose(im)  # a photo taken upright is upright: boxes and masks follow
                    w, h = im.size
                    # the run's evaluation transform (resize to cover, centre crop), else squashed to its size
                    size = None if self.any_size else self.fit or (self.size[1], self.size[0])
                    a = to_array(im, self.channels, size, oriented=True)
                except (OSError, ValueError) as e:
                    raise UploadError("unreadable_image", 400, f"{name}: the {fmt} image cannot be decoded: {e}",
                                      "the file is truncated or damaged; send it again or re-save it") from None
        except UploadError:
            raise
        except VisrecError as e:
            if "claims" in e.message:
                raise UploadError("too_many_pixels", 413, e.message.split(" (a decompression")[0]
                                  + f": refused before decoding (the limit is {self.max_pixels:,} pixels)",
                                  "downscale the image first" + (", or raise it with " + limit
                                                                 if what != "upload" else "")) from None
            raise UploadError("unreadable_image", 400, f"{name}: the {fmt} header cannot be read ({e.message})",
                              "the file is damaged or not what its first bytes say; send it again or re-save it"
                              ) from None
        return Prepared(name, torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous(), w, h, fmt,
                        data)

    # ---------------------------------------------------------------- outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's raw outputs for a uint8 batch, through the backend, with the run's test-time augmentation."""
        return predict_logits(self.lm.model, x, self.lm.normalizer, batch_size=max(1, len(x)),
                              channels_last=self.lm.channels_last, tta=self.tta_mode, crop_pad=self.crop_pad).cpu()

    def answer(self, items: list[Prepared], outputs: Any, top_k: list[int]) -> list[Answer]:
        """The task's answers from the batch's raw outputs (None when `outputs == "structured"`: the predictor runs
        the network itself)."""
        raise NotImplementedError

    def __call__(self, items: list[Prepared], top_k: int | list[int] = 5) -> list[Answer]:
        """Answers for prepared inputs, in order; `top_k` may differ per input."""
        ks = top_k if isinstance(top_k, list) else [top_k] * len(items)
        with self.lock, torch.inference_mode():
            raw = self.forward(torch.stack([p.x for p in items])) if self.outputs == "tensor" else None
            return self.answer(items, raw, ks)

    def predict(self, inputs: list[Any], *, top_k: int = 5, errors: str = "raise") -> list[Prediction]:
        """Predictions for inputs of any kind `load` takes; `errors="collect"` answers the good ones and returns the
        bad ones with their error instead of raising at the first."""
        if errors not in ("raise", "collect"):
            raise VisrecError(f"errors={errors!r} is not valid", "use raise or collect")
        out: list[Prediction | None] = [None] * len(inputs)
        ready: list[tuple[int, Prepared]] = []
        for i, item in enumerate(inputs):
            name = str(item) if isinstance(item, str | Path) else f"<input {i}>"
            try:
                ready.append((i, self.load(item, name)))
            except VisrecError as e:
                if errors == "raise":
                    raise
                out[i] = Prediction(name, error=str(e))
        batch = max(1, self.cfg.eval.batch_size) if not self.any_size else 1
        for start in range(0, len(ready), batch):
            part = ready[start:start + batch]
            for (i, p), a in zip(part, self([p for _, p in part], top_k), strict=True):
                out[i] = Prediction(p.name, list(getattr(a, "top", [])), answer=a, width=p.width, height=p.height,
                                    item=p)
        return [p for p in out if p is not None]

    def write(self, fmt: str, predictions: list[Prediction], inputs: list[Path], say) -> str:
        """A file format of the task's beyond text and json (e.g. COCO results), as text; `say` reports notes."""
        raise VisrecError(f"--format {fmt} is not valid for a {self.task.name} run",
                          f"use {', '.join(self.formats)}")

    def describe(self) -> dict[str, Any]:
        """How inputs are prepared, for the server's model card."""
        return {"resize": "kept at its own size (the model resizes it)" if self.any_size
                else f"bilinear, {self.fit.describe()}" if self.fit is not None
                else f"bilinear to {self.size[1]}x{self.size[0]} (width x height)", "tta": self.tta_mode}

    def upload_scale(self, p: Prepared) -> tuple[float, float]:
        """The input's (width, height) per unit of the model's input: the input's size, unless the run letterboxed
        its images (then the whole model input is larger than the input's part of it)."""
        fit = self.fit
        if fit is None or fit.mode != "pad":
            return float(p.width), float(p.height)
        ch, cw = fit.content(p.width, p.height)
        return fit.width * p.width / cw, fit.height * p.height / ch


def class_scores(logits: torch.Tensor, classes: list[str], ks: list[int]) -> list[ClassScores]:
    """Top-k classes of each row of logits (k per row)."""
    probs = logits.float().softmax(1)
    kmax = min(max(ks), len(classes))
    p, idx = probs.topk(kmax, 1)
    return [ClassScores([(classes[j], float(v)) for v, j in zip(pr[:k].tolist(), ix[:k].tolist(), strict=True)])
            for pr, ix, k in zip(p, idx, ks, strict=True)]


def overlay_png(item: Prepared, mask: np.ndarray | None = None, box: list[float] | None = None) -> bytes:
    """The input at its own size with an RGBA `mask` (any size, stretched over it) and a `box` drawn on it."""
    from PIL import ImageDraw

    im = item.original().convert("RGBA")
    if mask is not None:
        im = Image.alpha_composite(im, Image.fromarray(mask, "RGBA").resize(im.size))
    if box is not None:
        ImageDraw.Draw(im).rectangle(box, outline=(220, 30, 30, 255), width=max(1, round(im.width / 100)))
    return png_bytes(np.asarray(im.convert("RGB")))


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(head) and not any(b < 9 for b in head)


__all__ = ["FORMATS", "Answer", "ClassScores", "NotSmall", "Prediction", "Predictor", "Prepared", "UploadError",
           "class_scores", "heat_rgba", "hex_color", "overlay_png", "palette", "png_bytes", "png_data_uri", "sniff"]
