"""The dataset catalog: where each dataset's files are found, how they are fetched, how they are read.

Lookup order for a dataset NAME: `data_dir` (the --data-dir option), $VISREC_DATA, the user cache
($XDG_CACHE_HOME/visrec or ~/.cache/visrec), then system folders (/usr/share/datasets,
/usr/local/share/datasets); in each, the folder NAME/ or the root itself. If nothing is found and
downloads are allowed, the official files are fetched into the cache and checked against their MD5.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import VisrecError, closest, unknown_name
from .download import cache_dir, download
from .folders import read_image_folder
from .images import ImageFiles
from .imageset import Dataset, ImageSet, index_targets, stratified_split, stratified_subset
from .sources import (
    CIFAR_LAYOUT,
    MNIST_FILES,
    RawSplits,
    find_idx_file,
    make_synthetic,
    read_cifar,
    read_digits,
    read_mnist_folder,
)

SYSTEM_DIRS = (Path("/usr/share/datasets"), Path("/usr/local/share/datasets"))

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


@dataclass
class CatalogEntry:
    name: str
    description: str
    folders: list[str]  # subfolder names tried under each search root
    locate: Callable[[Path], Path | None] | None  # a candidate folder -> what `read` takes, if present
    read: Callable[[Path | None], RawSplits]
    downloads: list[tuple[str, str]] = field(default_factory=list)  # (url, md5), saved under the cache
    system_package: str | None = None  # Debian/Ubuntu package that installs the files


CATALOG: dict[str, CatalogEntry] = {}


def register_dataset(entry: CatalogEntry) -> CatalogEntry:
    CATALOG[entry.name] = entry
    return entry


def _locate_idx(folder: Path) -> Path | None:
    ok = all(find_idx_file(folder, stem) for stem in MNIST_FILES.values())
    return folder if ok else None


def _locate_cifar(variant: str) -> Callable[[Path], Path | None]:
    lay = CIFAR_LAYOUT[variant]

    def locate(folder: Path) -> Path | None:
        if (folder / lay["folder"] / lay["meta"]).is_file():
            return folder / lay["folder"]
        if (folder / lay["meta"]).is_file():
            return folder
        if (folder / lay["archive"]).is_file():
            return folder / lay["archive"]
        return None

    return locate


register_dataset(CatalogEntry(
    "fashion-mnist",
    "Zalando Fashion-MNIST: 60k/10k grayscale 28x28 clothing images, 10 classes (IDX)",
    ["fashion-mnist", "FashionMNIST/raw"],
    _locate_idx,
    lambda p: read_mnist_folder(p, FASHION_CLASSES),
    [
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
         "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz",
         "25c81989df183df01b3e8a0aad5dffbe"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz",
         "bef4ecab320f06d8554ea6380940ec79"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz",
         "bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    system_package="dataset-fashion-mnist",
))

register_dataset(CatalogEntry(
    "mnist",
    "LeCun MNIST: 60k/10k grayscale 28x28 handwritten digits (IDX)",
    ["mnist", "MNIST/raw"],
    _locate_idx,
    lambda p: read_mnist_folder(p, [str(i) for i in range(10)]),
    [
        (MNIST_URL + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        (MNIST_URL + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        (MNIST_URL + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        (MNIST_URL + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
))

register_dataset(CatalogEntry(
    "cifar10",
    "CIFAR-10: 50k/10k color 32x32 images, 10 classes (python batches, folder or .tar.gz)",
    ["cifar10", "cifar-10"],
    _locate_cifar("cifar10"),
    lambda p: read_cifar(p, "cifar10"),
    [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
))

register_dataset(CatalogEntry(
    "cifar100",
    "CIFAR-100: 50k/10k color 32x32 images, 100 fine classes (python batches, folder or .tar.gz)",
    ["cifar100", "cifar-100"],
    _locate_cifar("cifar100"),
    lambda p: read_cifar(p, "cifar100"),
    [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")],
))

register_dataset(CatalogEntry(
    "digits",
    "scikit-learn's bundled 8x8 digits: 1797 grayscale images, 10 classes, no official test split",
    [],
    None,
    lambda _: read_digits(),
))

register_dataset(CatalogEntry(
    "synthetic",
    "procedural gratings, deterministic: synthetic:classes=10,channels=1,size=28,train=2000,test=500,seed=0",
    [],
    None,
    lambda _: make_synthetic("synthetic"),
))


register_dataset(CatalogEntry(
    "scenes",
    "generated 64x64 scenes of 1-4 Fashion-MNIST objects with boxes, masks and captions (scenes:mnist, "
    "scenes:digits for other objects, scenes:shapes for colored circles, squares and triangles; data.scene_size, "
    "data.max_objects, data.scene_count)",
    [],
    None,
    lambda _: read_scene_source("scenes")[0],
))


CACHE_MODES = ("auto", "memory", "disk", "none")  # data.cache (see visrec.data.decoded_cache)


def dataset_names() -> list[str]:
    return [*CATALOG, "folder:PATH", "coco:PATH", "yolo:PATH", "wds:PATH"]


def is_scene_source(name: str) -> bool:
    """Whether the data has objects (boxes, masks, captions): generated scenes, a COCO or a YOLO folder."""
    return name.startswith(("coco:", "yolo:")) or _base_name(name) == "scenes"


def read_scene_source(name: str, data_dir=None, image_size: int | None = None, channels: int | None = None, *,
                      scene_size: int = 64, max_objects: int = 4, scene_count: int = 10_000, seed: int = 0,
                      cache: str = "auto", memory_budget: str | int | None = "auto") -> tuple[RawSplits, str]:
    """RawSplits with targets for `scenes[:SOURCE]`, `coco:PATH` or `yolo:PATH`; each image's label is the class
    of its largest object (visrec's own class `(no object)` is added when some image has none). COCO and YOLO images
    stay in their files (masks drawn when read) with `cache` none, or auto when decoded they would take more than
    `memory_budget`."""
    from .coco import read_coco
    from .folders import memory_budget_bytes
    from .scenes import generate_scenes
    from .yolo import read_yolo

    stream = {"stream": True if cache == "none" else None if cache == "auto" else False,
              "memory_budget": memory_budget_bytes(memory_budget)}
    if name.startswith("yolo:"):
        where = name.split(":", 1)[1]
        classes, splits = read_yolo(where, image_size, channels, **stream)
    else:
        where = name.split(":", 1)[1] if name.startswith("coco:") else str(generate_scenes(
            name, count=scene_count, size=scene_size, max_objects=max_objects, seed=seed, data_dir=data_dir))
        classes, splits = read_coco(where, image_size, channels, **stream)
    return objects_raw(classes, splits, image_size), where


def objects_raw(classes: list[str], splits: dict, image_size: int | None) -> RawSplits:
    """RawSplits of images with objects (CocoSplits by split): labels, targets, the dataset's ids and the fit."""
    from .coco import NO_OBJECT, to_targets

    empty = any(len(b) == 0 for sp in splits.values() for b in sp.boxes)
    classes = [*classes, NO_OBJECT] if empty else classes
    converted = {s: (sp.images, *to_targets(sp, len(classes) - 1)) for s, sp in splits.items()}
    x, y, t = converted["train"]
    raw = RawSplits(x, y, None, None, classes, train_targets=t)
    test = converted.get("test") or converted.get("val")  # no test split: the official val split is the test
    if test is not None:
        raw.test_images, raw.test_labels, raw.test_targets = test
    if "test" in converted and "val" in converted:
        raw.val_images, raw.val_labels, raw.val_targets = converted["val"]
    scored = splits.get("test") or splits.get("val") or splits["train"]  # results files name the test file's ids
    raw.category_ids = scored.category_ids or None
    first = splits["train"].images
    if not isinstance(first, torch.Tensor):  # streamed: its letterbox, recorded in runs as for decoded images
        raw.fit, raw.cache = first.fit, "none"
    elif image_size:  # letterboxed: recorded in runs, so that serving fits an upload the same way
        from .images import Fit

        raw.fit = Fit.square(image_size, mode="pad")
    return raw


def _base_name(name: str) -> str:
    return name.split(":", 1)[0]


def search_roots(data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(folder, why it is searched) in lookup order."""
    roots = []
    if data_dir:
        roots.append((Path(data_dir), "--data-dir"))
    if os.environ.get("VISREC_DATA"):
        roots.append((Path(os.environ["VISREC_DATA"]), "$VISREC_DATA"))
    roots.append((cache_dir(), "user cache"))
    roots += [(d, "system") for d in SYSTEM_DIRS]
    return roots


def candidate_folders(entry: CatalogEntry, data_dir: str | os.PathLike | None = None) -> list[Path]:
    out = []
    for root, why in search_roots(data_dir):
        out += [root / f for f in entry.folders]
        if why == "--data-dir":  # an explicit folder may hold the files themselves
            out.append(root)
    return out


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the files of catalog dataset `name` are, or None."""
    entry = _entry(name)
    if entry.locate is None:
        return None
    for folder in candidate_folders(entry, data_dir):
        if folder.is_dir() and (found := entry.locate(folder)):
            return found
    return None


def _folder_kind(path: Path) -> str:
    """The source prefix a folder's layout asks for: COCO (annotations/), YOLO (data.yaml) or class subfolders."""
    return "coco" if (path / "annotations").is_dir() else "yolo" if (path / "data.yaml").is_file() else "folder"


def source_name(name: str) -> str:
    """A dataset as typed on the command line, made explicit: a path to a folder that is no catalog name becomes
    `folder:PATH` (or `coco:PATH`, `yolo:PATH`, by its layout), so the run's config says what was read."""
    if _base_name(name) in CATALOG or name.startswith(("folder:", "coco:", "yolo:", "wds:")):
        return name
    path = Path(name).expanduser()
    return f"{_folder_kind(path)}:{name}" if path.is_dir() else name


def source_label(name: str) -> str:
    """A dataset's short name for folder names (letters, digits, `.`, `_`, `-`): a folder:, coco: or yolo: source by
    its folder's name (two folders, two labels), any other by its name before options (`synthetic:classes=3` ->
    synthetic)."""
    prefix, _, rest = name.partition(":")
    if prefix == "wds":  # shards: the folder that holds them
        rest = rest.split("{")[0].rsplit("/", 1)[0] if rest.endswith((".tar", ".json")) or "{" in rest else rest
    return slug(Path(rest.rstrip("/")).name or prefix if prefix in ("folder", "coco", "yolo", "wds") else prefix,
                "data")


def slug(text: str, empty: str) -> str:
    """`text` as a piece of a folder name: runs of other characters than letters, digits, `.`, `_`, `-` become one
    `-`; `empty` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or empty


def looks_like_path(name: str) -> bool:
    """Whether a dataset name is written as a path (`./photos`, `~/data`, `a/b`, `C:\\x`) rather than a catalog name."""
    return name.startswith((".", "~", "/")) or "/" in name or "\\" in name


def _entry(name: str) -> CatalogEntry:
    base = _base_name(name)
    if base not in CATALOG:
        path = Path(name).expanduser()
        if path.is_dir():  # a folder given as a name in a config
            raise VisrecError(f"dataset {name!r} is a folder, not a catalog name",
                              f"give it as {_folder_kind(path)}:{name} (image folders: one subfolder per class)")
        if looks_like_path(name):
            near = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
            close = closest(path.name, near)
            raise VisrecError(f"folder {path} does not exist",
                              (f"did you mean {path.parent / close}? " if close else "") + "give the path of a folder "
                              "of images (one subfolder per class), a COCO folder (annotations/) or a YOLO folder "
                              "(data.yaml)")
        raise unknown_name("dataset", name, dataset_names())
    return CATALOG[base]


def how_to_get(name: str, data_dir: str | os.PathLike | None = None) -> str:
    entry = _entry(name)
    lines = [f"visrec data fetch {name}        (downloads into {cache_dir() / entry.folders[0]})"]
    if entry.system_package:
        lines.insert(0, f"sudo apt-get install {entry.system_package}   (Debian/Ubuntu)")
    if entry.downloads:
        urls = ", ".join(u for u, _ in entry.downloads)
        lines.append(f"or download {urls} into a folder named {entry.folders[0]}/ under any searched folder")
    return "\n    ".join(lines)


def fetch(name: str, dest_root: Path | None = None) -> Path:
    """Download a catalog dataset into the cache (or `dest_root`/NAME), verifying checksums."""
    entry = _entry(name)
    if not entry.downloads:
        raise VisrecError(f"dataset {name!r} needs no download ({entry.description})")
    dest = (dest_root or cache_dir()) / entry.folders[0]
    for url, md5 in entry.downloads:
        download(url, dest / url.rsplit("/", 1)[1], md5)
    found = entry.locate(dest) if entry.locate else dest
    if found is None:
        raise VisrecError(f"downloaded {name} into {dest}, but its files are not in the expected layout")
    return found


def read_source(name: str, data_dir=None, download_missing: bool = True, image_size=None, channels=None,
                skip_bad_images: bool = False, max_pixels: int | None = None, cache: str = "auto",
                stream: dict | None = None, **scenes: int):
    """(RawSplits, where they came from) for any dataset name; `scenes` are the generator's options
    (scene_size, max_objects, scene_count); `stream` the image folder's memory_budget, crop_pct and
    max_bad_fraction."""
    if is_scene_source(name):
        budget = (stream or {}).get("memory_budget", "auto")
        return read_scene_source(name, data_dir, image_size, channels, cache=cache, memory_budget=budget, **scenes)
    if name.startswith("wds:"):
        from .shards import read_shards

        spec = name.split(":", 1)[1]
        spec = spec if "://" in spec else str(Path(spec).expanduser())
        return read_shards(spec, image_size, cache=cache, **(stream or {})), spec
    if name.startswith("folder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        return read_image_folder(path, image_size, channels, skip_bad=skip_bad_images, max_pixels=max_pixels,
                                 cache=cache, **(stream or {})), str(path)
    entry = _entry(name)
    if entry.name == "synthetic":
        return make_synthetic(name), name
    if entry.locate is None:
        return entry.read(None), "bundled with scikit-learn"
    where = locate(name, data_dir)
    if where is None:
        if download_missing and entry.downloads:
            try:
                where = fetch(name)
            except VisrecError as e:
                raise _not_found(name, data_dir, f"download failed: {e.message}") from None
        else:
            raise _not_found(name, data_dir, "downloads are off (data.download=false)")
    return entry.read(where), str(where)


def _not_found(name: str, data_dir, why: str) -> VisrecError:
    entry = _entry(name)
    looked = "\n    ".join(str(f) for f in candidate_folders(entry, data_dir))
    return VisrecError(
        f"dataset {name!r} not found; {why}. Looked in:\n    {looked}",
        f"get the files with one of:\n    {how_to_get(name, data_dir)}\n  or point --data-dir / $VISREC_DATA at them",
    )


def _adapt(x: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """Resize (bilinear, antialiased) and convert channels of a uint8 batch, for catalog datasets."""
    if channels is not None and channels != x.shape[1]:
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        elif channels == 1 and x.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma, as PIL's convert("L")
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise VisrecError(f"data.channels={channels}: cannot convert {x.shape[1]}-channel images", "use 1 or 3")
    if image_size is not None and tuple(x.shape[2:]) != (image_size, image_size):
        out = []
        for chunk in x.split(4096):
            y = F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", antialias=True)
            out.append(y.round().clamp(0, 255).to(torch.uint8))
        x = torch.cat(out)
    return x


def load_dataset(
    name: str = "fashion-mnist",
    *,
    data_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    subset: int | None = None,
    download: bool = True,
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
    max_pixels: int | None = None,
    classes: list[str] | None = None,
    scene_size: int = 64,
    max_objects: int = 4,
    scene_count: int = 10_000,
    cache: str = "auto",
    memory_budget: str | int | None = "auto",
    crop_pct: float | None = None,
    max_bad_fraction: float = 0.01,
) -> Dataset:
    """Load a dataset by name, with seeded stratified val (and, if it has none, test) splits.

    >>> ds = load_dataset("digits")
    >>> ds
    Dataset('digits', train=1295, val=143, test=359, shape=1x8x8, classes=10)
    """
    if not 0 <= val_fraction < 1:
        raise VisrecError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    if not 0 < test_fraction < 1:
        raise VisrecError(f"data.test_fraction={test_fraction} must be in (0, 1)")
    if cache not in CACHE_MODES:
        raise VisrecError(f"data.cache={cache!r} is not valid", f"use one of: {', '.join(CACHE_MODES)}")
    stream = {"memory_budget": memory_budget, "crop_pct": crop_pct, "max_bad_fraction": max_bad_fraction}
    raw, source = read_source(name, data_dir, download, image_size, channels, skip_bad_images, max_pixels, cache,
                              stream, scene_size=scene_size, max_objects=max_objects, scene_count=scene_count)
    if not name.startswith(("folder:", "wds:")) and not is_scene_source(name):
        raw.train_images = _adapt(raw.train_images, image_size, channels)
        if raw.test_images is not None:
            raw.test_images = _adapt(raw.test_images, image_size, channels)
    if classes:
        if raw.train_targets is not None:
            raise VisrecError(f"data.classes does not apply to {name!r}: its images hold objects of several classes",
                              "leave data.classes empty for scenes, COCO and YOLO data")
        _keep_classes(raw, classes, name)
    x, y, classes = raw.train_images, raw.train_labels, raw.classes
    if not classes:  # one class is data for tasks that need no labels (style); classification refuses it
        raise VisrecError(f"dataset {name!r} has no classes", "give data with at least one class of images")

    def part(images, labels: torch.Tensor, targets, index: torch.Tensor | None = None) -> ImageSet:
        """The split of these images at `index` (all when None); files are decoded now, only those kept."""
        if isinstance(images, ImageFiles):
            images = images.take(index)
        elif index is not None:
            images = images[index] if isinstance(images, torch.Tensor) else images.select(index)  # streamed: kept so
        if index is not None:
            labels = labels[index]
            targets = index_targets(targets, index) if targets is not None else None
        return ImageSet(images, labels, classes, name, targets, raw.category_ids)

    splits: dict = {"seed": split_seed}
    if raw.skipped:
        splits["skipped_images"] = {"count": len(raw.skipped), "files": raw.skipped}
    pool = torch.arange(len(y))

    if raw.test_images is not None:
        test = part(raw.test_images, raw.test_labels, raw.test_targets)
        splits["test"] = {"kind": "official", "n": len(test)}
    else:
        keep, held = stratified_split(y, test_fraction, split_seed)
        test = part(x, y, raw.train_targets, held)
        pool = keep
        splits["test"] = {"kind": "held-out", "fraction": test_fraction, "stratified": True, "n": len(held),
                          "indices": held.tolist()}

    if raw.val_images is not None:
        val = part(raw.val_images, raw.val_labels, raw.val_targets)
        splits["val"] = {"kind": "official", "n": len(val)}
    elif val_fraction > 0:
        keep, held = stratified_split(y[pool], val_fraction, split_seed + 1)
        val = part(x, y, raw.train_targets, pool[held])
        splits["val"] = {"kind": "held-out", "fraction": val_fraction, "stratified": True, "n": len(held),
                         "indices": pool[held].tolist()}
        pool = pool[keep]
    else:
        val = None
        splits["val"] = {"kind": "none"}

    if subset is not None:
        if subset < len(classes):
            raise VisrecError(f"data.subset={subset} is smaller than the number of classes ({len(classes)})")
        pick = stratified_subset(y[pool], subset, split_seed + 2)
        pool = pool[pick]
        splits["subset"] = {"n": len(pool), "stratified": True}
    train = part(x, y, raw.train_targets, pool)
    splits["train"] = {"n": len(train)}
    if raw.fit is not None:
        splits["input"] = {"cache": raw.cache, **raw.fit.state()}
    return Dataset(name, train, val, test, source, splits, fit=raw.fit, notes=raw.notes, bad=raw.bad)


def _keep_classes(raw: RawSplits, wanted: list[str], name: str) -> None:
    """Drop every image of a class not in `wanted`; labels are renumbered in the dataset's own class order."""
    unknown = [c for c in wanted if c not in raw.classes]
    if unknown:
        raise VisrecError(f"data.classes: dataset {name!r} has no class {', '.join(map(repr, unknown))}",
                          f"its classes are: {', '.join(raw.classes)}")
    kept = [c for c in raw.classes if c in wanted]
    lut = torch.full((len(raw.classes),), -1, dtype=torch.long)
    lut[[raw.classes.index(c) for c in kept]] = torch.arange(len(kept))
    for split in ("train", "test", "val"):
        images, labels = getattr(raw, f"{split}_images"), getattr(raw, f"{split}_labels")
        if images is None:
            continue
        new = lut[labels]
        mask = new >= 0
        setattr(raw, f"{split}_images", images[mask])
        setattr(raw, f"{split}_labels", new[mask])
    raw.classes = kept


def dataset_status(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """For `visrec datasets`: every catalog dataset, whether it is found, where, and its size on disk."""
    rows = []
    for name, entry in CATALOG.items():
        if entry.locate is None:
            where = {"digits": "bundled with scikit-learn", "scenes": "generated on demand, cached as COCO"}.get(
                name, "generated on demand")
            rows.append({"name": name, "found": True, "where": where, "bytes": 0, "description": entry.description})
            continue
        found = locate(name, data_dir)
        size = 0
        if found is not None:
            files = [found] if found.is_file() else [p for p in found.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
        rows.append({"name": name, "found": found is not None, "where": str(found) if found else None,
                     "bytes": size, "description": entry.description})
    return rows

