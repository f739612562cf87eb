"""Downloads with checksum verification, written atomically into the user cache."""

from __future__ import annotations

import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import VisrecError
from ..io import atomic_path, user_cache_dir


def cache_dir() -> Path:
    """The user cache for datasets: $XDG_CACHE_HOME/visrec or ~/.cache/visrec."""
    return user_cache_dir()


def md5_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest`, verifying `md5`; an existing file with the right checksum is kept."""
    if dest.is_file() and (md5 is None or md5_of(dest) == md5):
        return dest
    h = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            with open(tmp, "wb") as out:
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if sys.stderr.isatty() and total:
                        print(f"\r  {dest.name}: {done / total:6.1%} of {total / 1e6:.1f} MB", end="", file=sys.stderr)
            if sys.stderr.isatty() and total:
                print(file=sys.stderr)
            if md5 is not None and h.hexdigest() != md5:
                raise VisrecError(
                    f"checksum mismatch for {url}: expected md5 {md5}, got {h.hexdigest()}",
                    "the download was corrupted or the source changed; try again, or fetch the file by hand",
                )
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise VisrecError(f"could not download {url}: {reason}",
                          f"check the network (a proxy is read from $https_proxy), or download the file by hand into "
                          f"{dest.parent} (visrec checks its md5 and uses it)") from None
    return dest
