"""Shards: a dataset packed into WebDataset tar files (the format timm, OpenCLIP and webdataset read), for data too
large or too remote for a folder of files.

`visrec data pack SRC DEST --shard-size 1GB` reads SRC's splits as training would (the same seeded validation and test
splits) and writes `DEST/{train,val,test}-NNNNNN.tar`: each sample is `KEY.<ext>` (the image file's own bytes, never
re-encoded), `KEY.cls` (the class index, ASCII) and `KEY.json` (the class name and the file it came from); the
training samples in a seeded random order, so that any run of consecutive samples mixes the classes. `DEST/index.json`
says the format, the classes, each split's sample and class counts, each shard's samples and bytes, and where each
sample's image sits (shard, byte offset, size), which lets evaluation and the doctor read any sample without reading
a shard from its start.

`wds:DEST` (or `wds:DEST/index.json`) trains on them from a local path or any fsspec URL (`s3://`, `gs://`,
`https://`, ...), without unpacking; `wds:DEST/train-{000000..000009}.tar` names the training shards explicitly (the
other splits come from the index beside them). A sample's image is read by a byte-range read of its shard
(`fsspec`'s `cat_file`), so every worker process and rank reads only its own samples, in any order: the streamed
path's resumable order, per-rank shares and bad-file accounting apply unchanged.
"""

from __future__ import annotations

import functools
import io
import json
import re
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import parse_size
from ..errors import VisrecError
from .images import IMAGE_EXTENSIONS
from .stream import Delivery

FORMAT = "visrec-webdataset-1"
INDEX = "index.json"


@dataclass(frozen=True)
class ShardMember:
    """One sample's image inside a shard: the shard's URL or path, where its bytes start, how many, and its name."""

    url: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        fs, path = _filesystem(self.url)
        try:
            data = fs.cat_file(path, start=self.offset, end=self.offset + self.size)
        except (OSError, ValueError) as e:
            raise VisrecError(f"cannot read {self}: {e}", "check that the shard is there and complete") from None
        if len(data) != self.size:
            raise VisrecError(f"{self}: the shard ends {self.size - len(data)} bytes early (truncated)",
                              "pack the dataset again, or copy the shard again")
        return data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read())

    def __str__(self) -> str:
        return f"{self.url}:{self.name}"


@functools.lru_cache(maxsize=64)
def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def is_member(ref: Any) -> bool:
    return isinstance(ref, ShardMember)


# ---------------------------------------------------------------- packing


def pack(source: str, dest: str, shard_size: int | str = "1GB", *, seed: int = 0,
         say: Callable[[str], None] | None = None, **load: Any) -> dict:
    """Write `source`'s splits as WebDataset shards under `dest` (a folder or an fsspec URL), with index.json; `load`
    are load_dataset's split options (val_fraction, test_fraction, split_seed, subset, classes). Returns the index."""
    limit = parse_size(shard_size, "--shard-size")
    try:
        return _pack(source, dest, limit, seed, say, load)
    except OSError as e:  # a full disk, a folder that cannot be written, a store that refuses
        raise VisrecError(f"cannot write the shards to {dest}: {e}", "choose a DEST that can be written, with "
                          "room for the dataset's files (about their size on disk)") from None


def _pack(source: str, dest: str, limit: int, seed: int, say: Callable[[str], None] | None, load: dict) -> dict:
    from .catalog import load_dataset
    from .stream import StreamedImages

    if source.startswith(("coco:", "yolo:")):
        return _pack_objects(source, dest, limit, say)
    if not source.startswith("folder:"):
        raise VisrecError(f"visrec data pack reads image folders, COCO and YOLO folders, not {source!r}",
                          "give folder:PATH, coco:PATH or yolo:PATH (or a folder's path)")
    ds = load_dataset(source, cache="none", max_bad_fraction=1.0, **load)
    index: dict[str, Any] = {"format": FORMAT, "source": source, "classes": ds.classes, "channels": ds.channels,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "splits_made": ds.splits, "splits": {}}
    for split in ("train", "val", "test"):
        part = ds.split(split) if split != "val" or ds.val is not None else None
        if part is None or not len(part):
            continue
        images = part.images
        assert isinstance(images, StreamedImages)
        order = list(range(len(part)))
        if split == "train":  # consecutive samples mix the classes: a shuffle buffer then suffices
            order = torch.randperm(len(part), generator=torch.Generator().manual_seed(seed)).tolist()
        labels = part.labels.tolist()
        index["splits"][split] = _write_split(split, [images.paths[i] for i in order], [labels[i] for i in order],
                                              ds.classes, dest, limit, say)
    _write_bytes(_join(dest, INDEX), (json.dumps(index, indent=1) + "\n").encode())
    return index


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _write_bytes(url: str, data: bytes) -> None:
    """A whole file, atomically where the filesystem allows it (local paths: a temporary name, then renamed)."""
    if "://" not in url:
        from ..io import atomic_path

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(url)) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = _filesystem(url)
    with fs.open(path, "wb") as f:
        f.write(data)


class _Shard:
    """One tar file being written: straight to its final place (local: under a temporary name, renamed on close)."""

    def __init__(self, url: str):
        self.url, self.count = url, 0
        if "://" in url:
            fs, path = _filesystem(url)
            self.file, self.tmp = fs.open(path, "wb"), None
        else:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(f"{url}.tmp")
            self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def add(self, name: str, data: bytes) -> int:
        """Append a member; the byte offset of its data in the shard."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        start = self.tar.offset + len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
        self.tar.addfile(info, io.BytesIO(data))
        return start

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def close(self) -> int:
        self.tar.close()
        self.file.close()
        size = self.tar.offset
        if self.tmp is not None:
            self.tmp.replace(self.url)
        return size


def _objects_docs(source: str) -> tuple[dict[str, dict], dict[str, dict[int, Path]]]:
    """A COCO or YOLO folder's splits as COCO documents, and where each image's file is: checked as training checks
    them (an error lists the problems). YOLO: image ids from 1 in reading order, category ids the class indices,
    boxes in pixels of each image's own size."""
    from .coco import check_coco_folder, problems_error
    from .images import peek
    from .yolo import _relative, scan_yolo_folder

    kind, root = source.split(":", 1)
    root = Path(root).expanduser()
    if kind == "coco":
        _, docs, problems, located = check_coco_folder(root)
    else:
        classes, splits, problems = scan_yolo_folder(root)
        docs, located = {}, {}
        cats = [{"id": k, "name": c} for k, c in enumerate(classes)]
        for split, items in splits.items():
            images, anns, where = [], [], {}
            for i, (path, rows) in enumerate(items, 1):
                w, h = peek(path)[1]
                images.append({"id": i, "file_name": _relative(path, root), "width": w, "height": h})
                where[i] = path
                for r in rows:
                    k, cx, cy, bw, bh = (float(v) for v in r[:5])
                    if bw > 0 and bh > 0:
                        anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(k), "iscrowd": 0,
                                     "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h],
                                     "area": bw * w * bh * h})
            docs[split], located[split] = {"images": images, "annotations": anns, "categories": cats}, where
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise problems_error(kind, root, errors)
    return docs, located


def _pack_objects(source: str, dest: str, limit: int, say: Callable[[str], None] | None) -> dict:
    """Images with objects: each split's images in shards (KEY.<ext> and KEY.json, its COCO entry and annotations)
    and the split's COCO document beside them (`{split}.coco.json`), the splits as the folder has them (validation
    is held out of train when training reads them, as from the folder)."""
    docs, located = _objects_docs(source)
    index: dict[str, Any] = {"format": FORMAT, "kind": "objects", "source": source,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "splits": {}}
    for split, doc in docs.items():
        by_image: dict[int, list[dict]] = {}
        for a in doc.get("annotations") or []:
            by_image.setdefault(a["image_id"], []).append(a)
        files = [located[split][im["id"]] for im in doc["images"]]
        notes = [json.dumps({"image": im, "annotations": by_image.get(im["id"], [])}).encode() for im in doc["images"]]
        written = _write_split(split, files, None, None, dest, limit, say, extra=notes)
        written["image_ids"] = [im["id"] for im in doc["images"]]
        written["annotations"] = f"{split}.coco.json"
        _write_bytes(_join(dest, written["annotations"]), json.dumps(doc).encode())
        index["splits"][split] = written
    index["classes"] = [str(c["name"]) for c in sorted(docs["train"].get("categories") or [],
                                                       key=lambda c: c.get("id", 0))]
    _write_bytes(_join(dest, INDEX), (json.dumps(index, indent=1) + "\n").encode())
    return index


def _write_split(split: str, files: list[Path], labels: list[int] | None, classes: list[str] | None, dest: str,
                 limit: int, say: Callable[[str], None] | None, extra: list[bytes] | None = None) -> dict:
    shards: list[dict] = []
    members: list[list[int]] = []  # per sample: shard number, byte offset, size
    shard: _Shard | None = None

    def close() -> None:
        nonlocal shard
        if shard is None:
            return
        size = shard.close()
        name = shard.url.rsplit("/", 1)[-1]
        shards.append({"name": name, "samples": shard.count, "bytes": size})
        if say is not None:
            say(f"{name}: {shard.count:,} samples, {size / 1e6:.2f} MB")
        shard = None

    for k, (path, label) in enumerate(zip(files, labels if labels is not None else [None] * len(files), strict=True)):
        data = Path(path).read_bytes()
        if shard is not None and shard.count and shard.bytes + len(data) > limit:
            close()
        if shard is None:
            shard = _Shard(_join(dest, f"{split}-{len(shards):06d}.tar"))
        key = f"{split}{k:08d}"
        ext = Path(path).suffix.lower() if Path(path).suffix.lower() in IMAGE_EXTENSIONS else ".img"
        members.append([len(shards), shard.add(f"{key}{ext}", data), len(data)])
        if labels is not None:  # a class per image
            shard.add(f"{key}.cls", str(label).encode())
            shard.add(f"{key}.json", json.dumps({"label": classes[label], "file": str(path)}).encode())
        else:  # objects: the image's COCO entry and annotations
            shard.add(f"{key}.json", extra[k])
        shard.count += 1
    close()
    out = {"samples": len(files), "shards": shards, "members": members}
    if labels is not None:
        out["counts"] = torch.bincount(torch.tensor(labels, dtype=torch.int64), minlength=len(classes)).tolist()
        out["labels"] = labels
    return out


# ---------------------------------------------------------------- reading


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept; several ranges multiply)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def read_index(spec: str) -> tuple[dict, str, list[str] | None]:
    """(index, the shards' base URL, the training shards named by a brace pattern or None) of `wds:SPEC`."""
    named = None
    if spec.endswith(".tar") or "{" in spec:
        named = expand_braces(spec)
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
    elif spec.endswith(".json"):
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
    else:
        base = spec.rstrip("/")
    url = _join(base, INDEX)
    fs, path = _filesystem(url)
    try:
        index = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise VisrecError(f"wds:{spec}: no {INDEX} in {base}", "give the folder `visrec data pack` wrote (its "
                          "index.json says the classes and where each sample is)") from None
    except (OSError, ValueError) as e:
        raise VisrecError(f"wds:{spec}: cannot read {url}: {e}") from None
    if index.get("format") != FORMAT:
        raise VisrecError(f"{url} is not a visrec shard index (format {index.get('format')!r})",
                          "pack the data with visrec data pack SRC DEST")
    return index, base, named


def read_shards(spec: str, image_size: int | None = None, crop_pct: float | None = None,
                max_bad_fraction: float = 0.01, cache: str = "auto", memory_budget: str | int | None = "auto",
                **_: Any):
    """RawSplits of `wds:SPEC`: each split's images as ShardMember references, read as they are needed (streamed;
    `cache` memory, or auto for a decoded set under 64 MB, decodes them into memory instead); sized and fitted as
    image folders are (see read_image_folder)."""
    from .folders import AUTO_DISK_BYTES, SIZE_SAMPLE, STREAM_CROP_PCT, choose_size, memory_budget_bytes
    from .images import Fit, ImageFiles, peek
    from .sources import RawSplits
    from .stream import BadFiles, say

    index, base, named = read_index(spec)
    if index.get("kind") == "objects":
        return _read_objects(spec, index, base, named, image_size, cache, memory_budget)
    splits = index["splits"]
    if "train" not in splits:
        raise VisrecError(f"wds:{spec}: the index has no training split", "pack a dataset with training images")

    def members(split: str) -> tuple[list[ShardMember], list[int]]:
        s = splits[split]
        urls = [_join(base, sh["name"]) for sh in s["shards"]]
        refs = [ShardMember(urls[k], off, size, f"{split}#{i}") for i, (k, off, size) in enumerate(s["members"])]
        labels = list(s["labels"])
        if split == "train" and named is not None:
            keep = {u.rsplit("/", 1)[-1] for u in named}
            unknown = sorted(keep - {sh["name"] for sh in s["shards"]})
            if unknown:
                raise VisrecError(f"wds:{spec}: {', '.join(unknown[:3])} not in the index's training shards",
                                  f"the training shards are {s['shards'][0]['name']} .. {s['shards'][-1]['name']}")
            picked = [i for i, r in enumerate(refs) if r.url.rsplit("/", 1)[-1] in keep]
            refs, labels = [refs[i] for i in picked], [labels[i] for i in picked]
        return refs, labels

    train_refs, train_labels = members("train")
    if not train_refs:
        raise VisrecError(f"wds:{spec}: no training samples", "name shards that hold some")
    notes: list[str] = []
    if image_size:
        h = w = image_size
    else:
        sample = train_refs[:: max(1, len(train_refs) // SIZE_SAMPLE)][:SIZE_SAMPLE]
        sizes = []
        for r in sample:
            try:
                sizes.append(peek(r, name=str(r))[1])
            except VisrecError:
                continue  # a damaged sample: left out and counted when it is read
        if not sizes:
            peek(sample[0], name=str(sample[0]))  # not one readable: the first one's error
        h, w = choose_size(sizes, notes)
    channels = int(index.get("channels", 3))
    decoded = sum(sp["samples"] for sp in splits.values()) * channels * h * w
    small = decoded < AUTO_DISK_BYTES and decoded <= memory_budget_bytes(memory_budget)
    mode = "memory" if cache == "memory" or (cache == "auto" and small) else "none"
    fit = Fit(h, w, (STREAM_CROP_PCT if mode == "none" else 1.0) if crop_pct is None else crop_pct)
    total = sum(s["samples"] for s in splits.values())
    bad = BadFiles(total, max_bad_fraction, say) if mode == "none" else None

    def files(refs: list) -> ImageFiles:
        return ImageFiles(refs, channels, fit, None, mode, bad)

    out = RawSplits(files(train_refs), torch.tensor(train_labels), None, None, list(index["classes"]), fit=fit,
                    cache=mode, bad=bad, notes=notes)
    for split in ("val", "test"):
        if split in splits:
            refs, labels = members(split)
            setattr(out, f"{split}_images", files(refs))
            setattr(out, f"{split}_labels", torch.tensor(labels, dtype=torch.int64))
    shards = len(splits["train"]["shards"]) if named is None else len(named)
    out.notes.append(f"streaming {len(train_refs):,} training samples from {shards} shard(s) in {base}")
    return out


def _read_objects(spec: str, index: dict, base: str, named: list[str] | None, image_size: int | None, cache: str,
                  memory_budget: str | int | None):
    """RawSplits of packed COCO/YOLO data: each split's COCO document with its images found in the shards, read as
    a COCO folder is (letterboxed; streamed above the memory budget, masks drawn when read)."""
    from .catalog import objects_raw
    from .coco import coco_splits
    from .folders import memory_budget_bytes

    if named is not None:
        raise VisrecError(f"wds:{spec}: packed COCO/YOLO data is read whole", f"give the folder: wds:{base}")
    docs, located, files = {}, {}, {}
    for split, s in index["splits"].items():
        url = _join(base, s["annotations"])
        fs, path = _filesystem(url)
        docs[split] = json.loads(fs.cat_file(path))
        urls = [_join(base, sh["name"]) for sh in s["shards"]]
        located[split] = {iid: ShardMember(urls[k], off, size, f"{split}#{i}")
                          for i, (iid, (k, off, size)) in enumerate(zip(s["image_ids"], s["members"], strict=True))}
        files[split] = url
    stream = True if cache == "none" else None if cache == "auto" else False
    classes, splits = coco_splits(files, docs, located, image_size, None, stream=stream,
                                  memory_budget=memory_budget_bytes(memory_budget))
    return objects_raw(classes, splits, image_size)


# ---------------------------------------------------------------- sequential reading (remote shards)


def _tar_samples(url: str) -> Any:
    """(key, {extension: (data offset, bytes)}) of each sample of a shard, read from its start to its end in one
    stream; a shard that ends early yields ("", {"error": message}) last."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            key, parts = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                k, _, ext = info.name.rpartition("/")[2].partition(".")
                if key is not None and k != key:
                    yield key, parts
                    parts = {}
                key = k
                parts[ext] = (info.offset_data, tar.extractfile(info).read())
            if key is not None:
                yield key, parts
    except (tarfile.TarError, OSError, EOFError) as e:
        yield "", {"error": f"{url}: the shard ends early or is damaged ({type(e).__name__}: {e})"}


def sequential_shards(setting: str, refs: list) -> bool:
    """Whether training reads shards in sequence (data.shard_read): asked for, or auto and they are remote."""
    if not refs or not is_member(refs[0]) or setting == "random":
        return False
    return setting == "sequential" or ("://" in refs[0].url and not refs[0].url.startswith("file://"))


def shard_plan(refs: list[ShardMember]) -> list[dict]:
    """The shards a split's samples sit in, in order: each one's URL, how many of the split's samples it holds, and
    which (by their data offset) with their index in the split."""
    plan: dict[str, dict] = {}
    for i, r in enumerate(refs):
        sh = plan.setdefault(r.url, {"url": r.url, "samples": 0, "index": {}})
        sh["samples"] += 1
        sh["index"][r.offset] = i
    return list(plan.values())


class ShardStream(torch.utils.data.IterableDataset):
    """What one worker process of one rank reads in an epoch: its own shards, each from its start to its end (one
    request per shard), through a seeded shuffle buffer, as whole batches of random-resized crops. Shards are dealt
    out per epoch: a seeded order, then rank r takes every world-th, and worker w of it every W-th of those."""

    def __init__(self, shards: list[dict], channels: int, fit: Any, batch: int, seed: int, rank: int, world: int,
                 scale, ratio, buffer: int):
        self.shards, self.channels, self.fit, self.batch = shards, channels, fit, batch
        self.seed, self.rank, self.world, self.scale, self.ratio, self.buffer = seed, rank, world, scale, ratio, buffer
        self.epoch, self.skip = 0, {}  # skip: worker -> batches it already gave this epoch (a resumed epoch)

    def assignment(self, epoch: int, workers: int) -> list[list[dict]]:
        """The shards each worker of this rank reads in `epoch`."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 1_009 + epoch))
        mine = [self.shards[i] for i in order.tolist()][self.rank :: self.world]
        return [mine[w::workers] for w in range(workers)]

    def __iter__(self):
        import numpy as np

        from .images import open_checked, random_crop_array
        from .stream import _collate, _why

        info = torch.utils.data.get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.set_num_threads(1)
        shards = self.assignment(self.epoch, workers)[w]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, w])
        skip = self.skip.get(w, 0) * self.batch  # samples a resumed epoch has already trained on
        pool: list[tuple[int, bytes | None, str]] = []
        batch: list[tuple[int, torch.Tensor | str]] = []

        def samples():
            for sh in shards:
                missing = dict(sh["index"])  # offset -> index: the split's samples in this shard not read yet
                for key, parts in _tar_samples(sh["url"]):
                    if "error" in parts:  # the rest of the shard is lost: each of its samples counted bad
                        for i in missing.values():
                            yield i, None, parts["error"]
                        break
                    image = next((parts[e] for e in parts if f".{e}" in IMAGE_EXTENSIONS or e == "img"), None)
                    i = missing.pop(image[0], None) if image is not None else None
                    if i is not None:  # a sample of this split (a subset may leave some out)
                        yield i, image[1], f"{sh['url']}:{key}"

        def drawn():
            for item in samples():
                pool.append(item)
                if len(pool) >= self.buffer:
                    yield pool.pop(int(rng.integers(len(pool))))
            while pool:
                yield pool.pop(int(rng.integers(len(pool))))

        for i, data, name in drawn():
            if skip > 0:
                skip -= 1
                continue
            if data is None:
                batch.append((i, f"{name}#{i}"))  # a damaged sample: its problem, never an exception
            else:
                try:
                    with open_checked(io.BytesIO(data), name=name) as im:
                        a = random_crop_array(im, self.channels, self.fit,
                                              np.random.default_rng([self.seed, self.epoch, i]), self.scale, self.ratio)
                    batch.append((i, torch.from_numpy(a).permute(2, 0, 1)))
                except (VisrecError, OSError, ValueError, SyntaxError) as e:
                    batch.append((i, f"{name}: {_why(e)}"))
            if len(batch) == self.batch:
                yield (*_collate(batch), w)
                batch = []


class ShardBatches(Delivery):
    """Training batches read from shards in sequence (data.shard_read=sequential): each rank and each of its worker
    processes reads only its own shards, whole, so remote shards cost one request each. The epoch has as many steps
    as the rank with the fewest samples fills (each worker gives whole batches only); a stopped epoch resumes at the
    batch it stopped at, the batches before it skipped without decoding (the same number of workers)."""

    def __init__(self, images: Any, targets: Any, batch_size: int, *, device: torch.device,
                 seed: int = 0, rank: int = 0, world: int = 1, workers: int = 0, scale=(0.08, 1.0),
                 ratio=(0.75, 4 / 3), bad: Any = None, buffer: int = 1000):
        from .stream import BadFiles, default_workers

        self.images, self.targets, self.device = images, targets, torch.device(device)
        self.batch_size = min(batch_size, len(images))
        self.rank, self.world = rank, world
        self.workers = workers or default_workers()
        self.bad = bad if bad is not None else BadFiles(len(images), 1.0)
        per_rank = self.batch_size // world
        self.stream = ShardStream(shard_plan(images.paths), images.channels, images.fit, per_rank, seed, rank, world,
                                  tuple(scale), tuple(ratio), buffer)
        self.read = 0
        self._last = None

    def _yields(self, epoch: int, rank: int) -> list[int]:
        """Whole batches each worker of `rank` gives in `epoch`."""
        s = self.stream
        saved, s.rank = s.rank, rank
        try:
            return [sum(sh["samples"] for sh in mine) // s.batch for mine in s.assignment(epoch, self.workers)]
        finally:
            s.rank = saved

    def steps(self, epoch: int) -> int:
        return min(sum(self._yields(epoch, r)) for r in range(self.world))

    def __len__(self) -> int:
        return self.steps(0)

    def epoch(self, epoch: int, start: int = 0):
        given = self._yields(epoch, self.rank)
        # the epoch's batches take the workers in turn, skipping those run dry: which worker gives batch n
        order, left = [], list(given)
        while any(left):
            for w in range(len(left)):
                if left[w]:
                    order.append(w)
                    left[w] -= 1
        steps = min(self.steps(epoch), len(order))
        done = [order[:start].count(w) for w in range(len(given))]  # a resumed epoch: batches each worker gave
        self.stream.epoch, self.stream.skip = epoch, dict(enumerate(done))
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda")
        waiting: dict[int, list] = {w: [] for w in range(len(given))}
        feed = iter(loader)

        def ordered():
            """The loader's batches in the epoch's own order (a resumed one starts its turns where the run was)."""
            for n in range(start, steps):
                want = order[n]
                while not waiting[want]:
                    item = next(feed, None)
                    if item is None:
                        return
                    waiting[item[3]].append(item[:3])
                yield waiting[want].pop(0)

        yield from self._deliver(ordered(), epoch)

    def close(self) -> None:
        pass
