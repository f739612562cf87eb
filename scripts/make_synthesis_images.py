"""Draw the content and style images of bench/synthesis.py (procedural, so they carry no licence): a small
landscape with a house (content) and a field of coloured brush strokes (style). Deterministic.

    python scripts/make_synthesis_images.py            # writes bench/images/content.png and style.png
    python scripts/make_synthesis_images.py DIR N      # also N landscape variants in DIR (fast style training)
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "bench" / "images"


def content(size: int = 256, seed: int | None = None) -> Image.Image:
    """The landscape; with a `seed`, a variant (house, tree, sun and hills moved and recoloured)."""
    rng = random.Random(seed)

    def j(v: float, spread: float = 0.08) -> float:  # a jittered position (fraction of the size)
        return (v + (rng.uniform(-spread, spread) if seed is not None else 0.0)) * size

    def c(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        if seed is None:
            return rgb
        return tuple(max(0, min(255, v + rng.randint(-50, 50))) for v in rgb)

    im = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(im)
    top, bottom = c((90, 150, 235)), c((190, 220, 215))
    for y in range(size):  # sky: a vertical gradient
        t = y / size
        d.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    sx, sy = j(0.81, 0.15), j(0.17, 0.06)
    d.ellipse([sx - size * 0.09, sy - size * 0.09, sx + size * 0.09, sy + size * 0.09], fill=c((255, 226, 120)))
    a, b, h = rng.uniform(3, 7) if seed is not None else 5.0, rng.uniform(9, 16) if seed is not None else 13.0, j(0.62)
    pts = [(x, h - 22 * math.sin(x / size * a) - 10 * math.sin(x / size * b)) for x in range(0, size + 1, 4)]
    d.polygon([(0, size), *pts, (size, size)], fill=c((70, 140, 60)))
    hx, hy, s = j(0.2, 0.15), j(0.5, 0.05), 1.0 + (rng.uniform(-0.25, 0.25) if seed is not None else 0.0)
    d.rectangle([hx, hy, hx + 0.28 * size * s, hy + 0.28 * size * s], fill=c((200, 80, 60)))
    d.polygon([(hx - 0.03 * size * s, hy), (hx + 0.14 * size * s, hy - 0.16 * size * s),
               (hx + 0.31 * size * s, hy)], fill=c((110, 50, 40)))
    d.rectangle([hx + 0.1 * size * s, hy + 0.12 * size * s, hx + 0.18 * size * s, hy + 0.28 * size * s],
                fill=c((80, 50, 30)))
    d.rectangle([hx + 0.03 * size * s, hy + 0.05 * size * s, hx + 0.08 * size * s, hy + 0.1 * size * s],
                fill=c((240, 240, 190)))
    tx, ty = j(0.68, 0.12), j(0.45, 0.05)
    d.rectangle([tx - 0.02 * size, ty + 0.05 * size, tx + 0.02 * size, ty + 0.29 * size], fill=c((100, 70, 40)))
    d.ellipse([tx - 0.1 * size, ty - 0.11 * size, tx + 0.1 * size, ty + 0.11 * size], fill=c((40, 110, 50)))
    return im


def style(size: int = 256, seed: int = 7) -> Image.Image:
    rng = random.Random(seed)
    palette = [(24, 40, 110), (240, 200, 40), (220, 90, 30), (40, 120, 190), (250, 240, 210), (20, 20, 40)]
    im = Image.new("RGB", (size, size), (30, 50, 120))
    d = ImageDraw.Draw(im)
    for _ in range(900):  # short curved strokes that swirl around a few centres
        cx, cy = rng.choice([(0.3, 0.3), (0.7, 0.35), (0.5, 0.75)])
        x, y = rng.random() * size, rng.random() * size
        ang = math.atan2(y - cy * size, x - cx * size) + math.pi / 2 + rng.uniform(-0.3, 0.3)
        length, width = rng.uniform(8, 22), rng.randint(2, 5)
        pts = []
        for _ in range(6):
            pts.append((x, y))
            x += math.cos(ang) * length / 6
            y += math.sin(ang) * length / 6
            ang += 0.12
        d.line(pts, fill=rng.choice(palette), width=width, joint="curve")
    return im.filter(ImageFilter.SMOOTH)


def variants(folder: Path, n: int, size: int = 128) -> list[Path]:
    """`n` landscape variants (seeds 1..n) as PNGs in `folder`: content images for training a fast style network."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(1, n + 1):
        out.append(folder / f"landscape{i:04d}.png")
        content(size, seed=i).save(out[-1])
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3:
        print(f"wrote {len(variants(Path(sys.argv[1]), int(sys.argv[2])))} images in {sys.argv[1]}")
    OUT.mkdir(parents=True, exist_ok=True)
    content().save(OUT / "content.png", optimize=True)
    style().save(OUT / "style.png", optimize=True)
    print(f"wrote {OUT / 'content.png'} and {OUT / 'style.png'}")
