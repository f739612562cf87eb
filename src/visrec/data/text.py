"""Captions as tokens: one normalization, one tokenizer and one vocabulary for training, decoding and scoring.

Normalization: Unicode folded to ASCII (accents dropped: "café" -> "cafe"), lowercased, every character other
than a-z, 0-9, hyphen and apostrophe turned into a space, spaces collapsed. Tokens are the words between spaces
("t-shirt" is one word). The vocabulary holds `<NULL>` (padding, 0), `<START>`, `<END>`, `<UNK>`, then the
training captions' words seen at least `min_count` times, most frequent first (ties alphabetical).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

import torch

from ..errors import VisrecError

NULL, START, END, UNK = 0, 1, 2, 3
SPECIALS = ["<NULL>", "<START>", "<END>", "<UNK>"]
_KEEP = re.compile(r"[^a-z0-9'\- ]+")


def normalize_caption(text: str) -> str:
    folded = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii").lower()
    return " ".join(_KEEP.sub(" ", folded).split())


def tokenize(text: str) -> list[str]:
    return normalize_caption(text).split()


class Vocabulary:
    """Words <-> ids. `encode` gives `<START> w1 .. wn <END>` padded with `<NULL>` to max_length + 2."""

    def __init__(self, words: list[str]):
        if words[:4] != SPECIALS:
            raise VisrecError(f"a caption vocabulary starts with {SPECIALS}, got {words[:4]}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, max_length: int) -> tuple[list[int], bool]:
        """(ids of length max_length + 2, whether the caption was cut to max_length words)."""
        ids = [self.index.get(w, UNK) for w in tokenize(text)]
        cut = len(ids) > max_length
        ids = [START, *ids[:max_length], END]
        return ids + [NULL] * (max_length + 2 - len(ids)), cut

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first <END> (specials dropped)."""
        out = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i > UNK:
                out.append(self.words[i] if i < len(self.words) else "<UNK>")
            elif i == UNK:
                out.append("<UNK>")
        return " ".join(out)

    def encode_references(self, captions: list[list[str]], max_length: int) -> tuple[torch.Tensor, int]:
        """(N, R, max_length + 2) ids of every image's references (R = the most any image has; missing ones all
        <NULL>), and how many captions were cut to max_length words."""
        r = max((len(c) for c in captions), default=1) or 1
        out = torch.zeros(len(captions), r, max_length + 2, dtype=torch.long)
        cut = 0
        for i, caps in enumerate(captions):
            for j, c in enumerate(caps):
                ids, was_cut = self.encode(c, max_length)
                out[i, j] = torch.tensor(ids)
                cut += was_cut
        return out, cut
