"""Image files to uint8 tensors, decoded the same way for training folders and for prediction.

Conversions (documented in the README): EXIF orientation is applied; images with transparency are
composited on white; 16-bit and 32-bit grayscale are scaled (not clipped) to 8 bits; CMYK and
palette images become RGB; grayscale becomes RGB when the set is in color, and color becomes
grayscale only when asked for explicitly.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import VisrecError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _natural(path: Path) -> list:
    """Sort key in reading order: the numbers in a path compare as numbers (img2 before img10)."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", str(path)))]


def expand_image_paths(paths: list[Path]) -> list[Path]:
    """Files as given, and each folder as the image files under it (recursively, in natural order; hidden files and
    other extensions skipped). A folder with no image file is an error that names it."""
    out: list[Path] = []
    for p in paths:
        if not p.is_dir():
            out.append(p)  # a missing or unreadable file is reported where it is read, with the others
            continue
        found = sorted((f for f in p.rglob("*") if f.is_file() and is_image_file(f)
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)), key=_natural)
        if not found:
            raise VisrecError(f"folder {p} holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                              "give image files, or a folder that holds some")
        out += found
    return out


MAX_PIXELS = 89_478_485  # Pillow's default: larger headers are treated as decompression bombs


@contextlib.contextmanager
def open_checked(path: Path | BinaryIO, max_pixels: int | None = None, limit_option: str = "--set data.max_pixels=N",
                 name: str | None = None) -> Iterator[Image.Image]:
    """The image opened, its header read and its pixels not yet decoded; refuses decompression bombs (more than
    `max_pixels`, default MAX_PIXELS). `limit_option` is how the caller's user raises the limit. `path` may be an
    open binary file; `name` is what errors call it (default: the path)."""
    limit = max_pixels or MAX_PIXELS
    name = name or str(path)
    if hasattr(path, "open") and not isinstance(path, Path):  # a sample inside a shard (shards.ShardMember)
        path = path.open()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow's own guard must not be stricter than the one asked for
    try:
        with warnings.catch_warnings():  # the limit is ours to report, once, below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:  # Pillow refuses twice its own limit before telling the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        claims = f"{int(found.group(1)):,}" if found else "far too many"
        raise VisrecError(f"image {name} claims {claims} pixels, above the {limit:,} limit "
                          "(a decompression bomb, or a genuinely huge image)",
                          f"remove it, downscale it, or raise the limit with {limit_option}") from None
    except (UnidentifiedImageError, OSError) as e:
        empty = isinstance(path, str | Path) and Path(path).is_file() and Path(path).stat().st_size == 0
        why = "the file is empty (0 bytes: an interrupted copy or download?)" if empty else str(e)
        raise VisrecError(f"cannot read image {name}: {why}", "remove or replace the file (visrec validate DATA "
                          "lists every bad file at once)") from None
    with im:
        w, h = im.size
        if w * h > limit:
            raise VisrecError(f"image {name} claims {w}x{h} = {w * h:,} pixels, above the {limit:,} limit "
                              "(a decompression bomb, or a genuinely huge image)",
                              f"remove it, downscale it, or raise the limit with {limit_option}")
        yield im


def peek(path: Path | BinaryIO, max_pixels: int | None = None, limit_option: str = "--set data.max_pixels=N",
         name: str | None = None) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the header, without decoding the pixels (see `open_checked`)."""
    with open_checked(path, max_pixels, limit_option, name) as im:
        return im.mode, im.size


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255) else 255.0
        if im.mode == "F":
            top = max(float(a.max()), 1.0)
        return Image.fromarray(np.round(a * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
    return im.convert("L")


def _flatten_alpha(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


# An image shrunk to a small size is first reduced by an integer factor, never below this many times the target
# size (a JPEG by libjpeg's DCT scaling while it decodes, as Pillow's thumbnail does), then resized: several times
# faster on photos, and the same picture
REDUCING_GAP = 2.0


@dataclass(frozen=True)
class Fit:
    """How an image of any size becomes the model's (height, width): `crop` scales it so that it covers the target
    divided by `crop_pct`, then takes the centre (timm's evaluation transform: crop_pct 0.875 keeps the central 87.5%,
    as random-resized crops frame objects in training; 1.0 keeps the whole shorter side); `pad` scales it to fit
    inside the target and fills the rest (bottom and right) with zeros, as a letterbox (images with objects: every
    object kept, at one scale for both axes; `content` says the part that is the image); `squash` resizes it to the
    target whatever its shape (visrec's rule before images kept their aspect ratio)."""

    height: int
    width: int
    crop_pct: float = 1.0
    mode: str = "crop"

    @classmethod
    def square(cls, size: int, crop_pct: float = 1.0, mode: str = "crop") -> Fit:
        return cls(size, size, crop_pct, mode)

    @classmethod
    def from_state(cls, state: dict | None) -> Fit | None:
        if not state:
            return None
        h, w = state["size"]
        return cls(int(h), int(w), float(state.get("crop_pct", 1.0)), state.get("mode", "crop"))

    def state(self) -> dict:
        return {"size": [self.height, self.width], "crop_pct": self.crop_pct, "mode": self.mode}

    def describe(self) -> str:
        if self.mode == "squash":
            return f"resized to {self.width}x{self.height}"
        if self.mode == "pad":
            return f"resized to fit inside {self.width}x{self.height}, the rest padded (letterbox)"
        if self.crop_pct == 1:
            return f"resized to cover {self.width}x{self.height}, centre crop"
        cover = f"{round(self.width / self.crop_pct)}x{round(self.height / self.crop_pct)}"
        return f"resized to cover {cover}, centre {self.width}x{self.height} crop (crop_pct {self.crop_pct:g})"

    def content(self, w: int, h: int) -> tuple[int, int]:
        """pad: the (height, width) a (w, h) image takes inside the output (the rest is padding)."""
        s = min(self.width / w, self.height / h)
        return max(1, min(self.height, round(h * s))), max(1, min(self.width, round(w * s)))

    def box(self, w: int, h: int) -> tuple[float, float, float, float] | None:
        """The region of a (w, h) image that becomes the output, in its pixels (None: all of it)."""
        if self.mode in ("squash", "pad"):
            return None
        scale = max(self.width / w, self.height / h) / self.crop_pct  # output pixels per input pixel
        cw, ch = self.width / scale, self.height / scale
        x0, y0 = (w - cw) / 2, (h - ch) / 2
        return (x0, y0, x0 + cw, y0 + ch)


Box = tuple[float, float, float, float]  # a region as fractions of the image's width and height: x0, y0, x1, y1


def _draft(im: Image.Image, wh: tuple[int, int], region: tuple[float, float] | None) -> None:
    """Ask a JPEG decoder for the smallest power-of-two reduction that keeps the output's source region (`region`:
    its shorter and longer side in pixels; None: the whole image, squashed) at least REDUCING_GAP times the output.
    Only before the pixels are read; the picture is the same, decoded several times faster."""
    if im.format != "JPEG" or not getattr(im, "tile", None):
        return
    if region is None:
        side = int(max(wh) * REDUCING_GAP)
        im.draft(None, (side, side))
        return
    k = max(wh) * REDUCING_GAP / max(region[0], 1.0)
    im.draft(None, (max(1, math.ceil(im.size[0] * k)), max(1, math.ceil(im.size[1] * k))))


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied (a quarter turn swaps them), from
    the header alone."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


DEFAULT_SCALE = (0.08, 1.0)  # random-resized crops: the fraction of the image's area (timm, torchvision)
DEFAULT_RATIO = (3 / 4, 4 / 3)  # ... and the aspect ratio range


def random_resized_box(w: int, h: int, rng: np.random.Generator, scale: tuple[float, float] = DEFAULT_SCALE,
                       ratio: tuple[float, float] = DEFAULT_RATIO) -> Box:
    """A random region of a w x h image, as fractions (x0, y0, x1, y1): `scale` of its area, aspect ratio (width /
    height) log-uniform in `ratio`; after ten misses, the centre at the nearest ratio in range (Szegedy et al., 2015,
    as torchvision and timm draw it)."""
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return (x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h)
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return (x0 / w, y0 / h, (x0 + cw) / w, (y0 + ch) / h)


def random_crop_array(im: Image.Image, channels: int, fit: Fit, rng: np.random.Generator, scale, ratio) -> np.ndarray:
    """A random-resized crop of an opened image (`random_resized_box` of its upright size) at the fit's size, as uint8
    (H, W, channels): what streamed training reads."""
    box = random_resized_box(*upright_size(im), rng, scale, ratio)
    return to_array(im, channels, (fit.width, fit.height), box=box)


def to_array(im: Image.Image, channels: int, size: int | tuple[int, int] | Fit | None = None, *,
             oriented: bool = False, box: Box | None = None) -> np.ndarray:
    """An opened image as uint8 (H, W, channels), converted as the module doc says. `size` resizes it (bilinear):
    to size x size or to (width, height), squashed; a `Fit` keeps its aspect ratio (see Fit). `box`: the region of the
    upright image to take and resize to `size` (a random-resized crop). `oriented`: the EXIF orientation was applied
    already (`ImageOps.exif_transpose`)."""
    wh = (size.width, size.height) if isinstance(size, Fit) else (size, size) if isinstance(size, int) else size
    if isinstance(size, Fit) and size.mode == "pad" and box is None:  # letterbox: scaled whole, then padded
        ch, cw = size.content(*(im.size if oriented else upright_size(im)))
        inner = to_array(im, channels, (cw, ch), oriented=oriented)
        out = np.zeros((size.height, size.width, inner.shape[2]), np.uint8)
        out[:ch, :cw] = inner
        return out
    if wh is not None and not oriented:
        w, h = upright_size(im)
        if box is not None:
            sides = ((box[2] - box[0]) * w, (box[3] - box[1]) * h)
            region: tuple[float, float] | None = (min(sides), max(sides))
        elif isinstance(size, Fit) and (fb := size.box(w, h)) is not None:
            region = (min(fb[2] - fb[0], fb[3] - fb[1]), 0.0)
        else:
            region = None
        _draft(im, wh, region)
    if not oriented:
        im = ImageOps.exif_transpose(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        im = _flatten_alpha(im)
    if channels == 1:
        im = _to_8bit_gray(im) if im.mode in GRAY_MODES else im.convert("L")
    else:
        im = _to_8bit_gray(im).convert("RGB") if im.mode in GRAY_MODES else im.convert("RGB")
    if wh is not None:
        w, h = im.size
        if box is not None:
            pixels: tuple[float, float, float, float] | None = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
        else:
            pixels = size.box(w, h) if isinstance(size, Fit) else None
        if pixels is not None or im.size != tuple(wh):
            im = im.resize(tuple(wh), Image.Resampling.BILINEAR, box=pixels, reducing_gap=REDUCING_GAP)
    a = np.array(im, dtype=np.uint8)  # a writable copy, detached from the file
    return a[:, :, None] if a.ndim == 2 else a


def decode(path: Path | BinaryIO, channels: int, size: int | Fit | None = None, name: str | None = None,
           box: Box | None = None) -> np.ndarray:
    """Decode one file (a path or an open binary file, called `name` in errors) to uint8 (H, W, channels),
    converting its mode as the module doc says."""
    try:
        if hasattr(path, "open") and not isinstance(path, Path):  # a sample inside a shard (shards.ShardMember)
            name, path = name or str(path), path.open()
        with Image.open(path) as im:
            return to_array(im, channels, size, box=box)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VisrecError(f"cannot decode image {name or path}: {e}", "remove or replace the file") from None


def native_channels(mode: str) -> int:
    return 1 if mode in GRAY_MODES else 3


def load_images(
    paths: list[Path], channels: int | None = None, size: int | Fit | None = None, workers: int | None = None,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """Decode files into one uint8 (N, C, H, W) tensor.

    Without `size`, every image must have the same size; the error lists the files that differ. With a `Fit`, each
    keeps its aspect ratio (see Fit); with an int, each is squashed to size x size.
    Without `channels`, the set is RGB if any file has color, else grayscale.
    """
    if not paths:
        h, w = (size.height, size.width) if isinstance(size, Fit) else (size or 1, size or 1)
        return torch.empty(0, channels or 1, h, w, dtype=torch.uint8)
    channels, (h, w) = check_headers(paths, channels, size, max_pixels)
    out = torch.empty(len(paths), channels, h, w, dtype=torch.uint8)  # filled in place: no list, stack or copy
    decode_into(out, paths, channels, size, workers)
    return out


def check_headers(paths: list[Path], channels: int | None, size: int | Fit | None, max_pixels: int | None
                  ) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) the files decode to, from their headers alone; without `size`, files of another
    size than the most common one are an error that lists them."""
    headers = [peek(p, max_pixels) for p in paths]
    if channels is None:
        channels = 3 if any(native_channels(m) == 3 for m, _ in headers) else 1
    if isinstance(size, Fit):
        return channels, (size.height, size.width)
    if size is not None:
        return channels, (size, size)
    sizes = Counter(s for _, s in headers)
    common = sizes.most_common(1)[0][0]
    odd = [(p, s) for p, (_, s) in zip(paths, headers, strict=True) if s != common]
    if odd:
        listed = "; ".join(f"{p} is {w}x{h}" for p, (w, h) in odd[:5])
        more = f" and {len(odd) - 5} more" if len(odd) > 5 else ""
        raise VisrecError(
            f"images differ in size: most are {common[0]}x{common[1]} (width x height), but {listed}{more}",
            "resize them all with --set data.image_size=N (square; visrec baseline: --image-size N), or fix "
            "those files",
        )
    return channels, (common[1], common[0])


def decode_into(out: torch.Tensor, paths: list[Path], channels: int, size: int | Fit | None,
                workers: int | None = None) -> None:
    """Decode file i into out[i] (uint8 (N, C, H, W), in memory or a memory-mapped file), in threads."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)

    def fill(i: int) -> None:
        out[i] = torch.from_numpy(decode(paths[i], channels, size)).permute(2, 0, 1)

    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        list(pool.map(fill, range(len(paths))))


@dataclass
class ImageFiles:
    """Image files not decoded yet: a split is decoded when it is made (`take`), so only the images a dataset keeps
    are decoded (a `data.subset` of a large folder decodes the subset), and no second copy of the whole folder is
    made to cut it into train, val and test."""

    paths: list[Path]
    channels: int
    size: int | Fit | None
    max_pixels: int | None = None
    # memory: decoded on every run; disk: once, into a memory-mapped file; none: left in the files and read batch by
    # batch (data.cache)
    cache: str = "memory"
    bad: object | None = None  # none: where files that cannot be read are recorded (a stream.BadFiles)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: torch.Tensor) -> ImageFiles:
        """The files at `index` (int positions or a bool mask), still not decoded."""
        idx = index.nonzero().flatten() if index.dtype == torch.bool else index
        return ImageFiles([self.paths[i] for i in idx.tolist()], self.channels, self.size, self.max_pixels,
                          self.cache, self.bad)

    def take(self, index: torch.Tensor | None = None):
        """uint8 (N, C, H, W) of the files at `index` (all when None), decoded now; with cache=none, a
        StreamedImages that decodes as it is read."""
        files = self if index is None else self[index]
        if self.cache == "none":
            from .stream import StreamedImages

            fit = self.size if isinstance(self.size, Fit) else Fit.square(self.size)
            return StreamedImages(files.paths, self.channels, fit, self.max_pixels, self.bad)
        if self.cache == "disk" and files.paths:
            from .decoded_cache import cached_images

            return cached_images(files.paths, self.channels, self.size, self.max_pixels)
        return load_images(files.paths, self.channels, self.size, max_pixels=self.max_pixels)


def scan_classes(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Class name -> sorted image files, for a folder of class subfolders; also the ignored files."""
    classes: dict[str, list[Path]] = {}
    ignored: list[Path] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file())
        classes[sub.name] = [p for p in files if is_image_file(p)]
        ignored += [p for p in files if not is_image_file(p)]
    return classes, ignored
