"""Image captioning: images -> word sequences, trained with teacher forcing on the data's captions.

Targets are every image's reference captions as token ids (N, R, max_length + 2); each training step takes
one reference per image at random (from the seeded global generator, saved in checkpoints). The loss is the
temporal softmax loss (cross-entropy summed over the words that are not padding, averaged over the batch), plus,
for `lstm_attention`, `task.attention_reg` times the doubly stochastic attention penalty.

Evaluation decodes greedily (or with `task.beam`) and scores against all references: corpus BLEU-1..4 with
sacrebleu (on the normalized words, tokenize=none) and CIDEr-D; `bleu4` is the primary metric. On data whose
references follow the scenes grammar, also object precision and recall, relation accuracy and size accuracy
(BLEU saturates on templated text; these say what is wrong). The test
evaluation writes `captions_test.json` in COCO results format ([{image_id, caption}]: a COCO folder's own image ids,
so its captions file scores it; other data numbers images from 1 in split order) and
`captions_test_references.json` beside it (with each image's file_name where the data has one).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AtLeast1, NonNeg
from ..data import Dataset, ImageSet, Normalizer
from ..data.text import NULL, Vocabulary, normalize_caption
from ..errors import VisrecError
from ..io import write_json
from ..models.caption import attention_penalty, masked_caption_loss
from ..prediction import Answer, Predictor, Prepared
from ..training.task import EvalSettings, Evaluation, Task


def corpus_bleu(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """BLEU-1..4 (0..1) of hypotheses against each image's references, with sacrebleu on words as given."""
    from sacrebleu.metrics import BLEU

    r = max((len(x) for x in refs), default=1)
    streams = [[x[i] if i < len(x) else None for x in refs] for i in range(r)]
    return {f"bleu{n}": BLEU(tokenize="none", max_ngram_order=n).corpus_score(hyps, streams).score / 100
            for n in range(1, 5)}


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d(hyps: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as the COCO caption evaluation computes it): TF-IDF n-gram vectors (n = 1..4,
    document frequencies over the references of the corpus), hypothesis counts clipped by the reference's,
    cosine similarity times a Gaussian penalty on the length difference (sigma 6), averaged over references and
    n, times 10; the corpus score is the mean over images."""
    if not hyps:
        return 0.0
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for k in range(1, n + 1) for g in _ngrams(r.split(), k)})
    log_n = math.log(float(len(refs)))

    def vec(words: list[str]):
        v, norms = [], []
        for k in range(1, n + 1):
            d = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in _ngrams(words, k).items()}
            v.append(d)
            norms.append(math.sqrt(sum(x * x for x in d.values())))
        return v, norms, len(words)

    total = 0.0
    for h, rs in zip(hyps, refs, strict=True):
        vh, nh, lh = vec(h.split())
        score = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r.split())
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                score[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        total += sum(score) / n / max(1, len(rs)) * 10.0
    return total / len(hyps)


RELATIONS = ("left of", "right of", "above", "below")
_SPLIT = re.compile(r" (left of|right of|above|below) ")
_PHRASE = re.compile(r"^an? (?:(small|large) )?(.+)$")


def parse_scene_caption(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]] | None:
    """The scenes grammar, `a [small|large] NAME (RELATION a [small|large] NAME)*`, read back: [(size, name)] and
    [(name, relation, next name)]; None when the text does not follow it."""
    parts = _SPLIT.split(text.strip())
    objs, rels = [], []
    for i, chunk in enumerate(parts[::2]):
        m = _PHRASE.match(chunk)
        if not m:
            return None
        objs.append((m.group(1) or "", m.group(2)))
        if i:
            rels.append((objs[i - 1][1], parts[2 * i - 1], objs[i][1]))
    return objs, rels


def scene_scores(hyps: list[str], refs: list[list[str]]) -> dict[str, float] | None:
    """What the scenes grammar makes checkable, against each image's first reference: object precision and recall
    (names, as multisets), the share of the reference's relations (name, relation, name) the caption states, and
    of the objects it names rightly, the share with the right size word. None unless every reference parses."""
    parsed = [parse_scene_caption(r[0]) for r in refs]
    if not parsed or any(p is None for p in parsed):
        return None
    hit = said = there = rel_hit = rel_all = size_hit = 0
    for h, ref in zip(hyps, parsed, strict=True):
        got = parse_scene_caption(h) or ([], [])
        want_names = Counter(n for _, n in ref[0])
        got_names = Counter(n for _, n in got[0])
        hit += sum((want_names & got_names).values())
        said += sum(got_names.values())
        there += sum(want_names.values())
        rel_all += len(ref[1])
        rel_hit += sum((Counter(ref[1]) & Counter(got[1])).values())
        sizes = Counter(ref[0])
        size_hit += sum((sizes & Counter(got[0])).values())
    return {"obj_precision": hit / max(1, said), "obj_recall": hit / max(1, there),
            "relation_acc": rel_hit / max(1, rel_all), "size_acc": size_hit / max(1, hit)}


class CaptionEvaluation(Evaluation):
    def __init__(self, split: str, metrics: dict[str, float], hyps: list[str], refs: list[list[str]],
                 image_ids: list[int] | None = None, file_names: list[str] | None = None):
        super().__init__(split, metrics)
        self.hyps, self.refs = hyps, refs
        self.image_ids = image_ids or list(range(1, len(hyps) + 1))
        self.file_names = file_names

    def save(self, folder: Path) -> None:
        write_json(folder / f"captions_{self.split}.json",
                   [{"image_id": i, "caption": h} for i, h in zip(self.image_ids, self.hyps, strict=True)])
        names = self.file_names or [None] * len(self.refs)
        write_json(folder / f"captions_{self.split}_references.json",
                   [{"image_id": i, **({"file_name": f} if f else {}), "captions": r}
                    for i, f, r in zip(self.image_ids, names, self.refs, strict=True)])


@dataclass
class Caption(Answer):
    """The image's caption; attention models add, per word, its weights over the encoder's grid (3 decimals)."""

    caption: str
    attention: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"caption": self.caption, **({"attention": self.attention} if self.attention is not None else {})}

    def text(self) -> str:
        return self.caption

    def draw(self, item: Prepared) -> bytes:
        maps = torch.tensor([m["weights"] for m in self.attention]) if self.attention else None
        return attention_png(item.x, self.caption, maps)


class CaptioningPredictor(Predictor):
    """A caption per image, decoded greedily or by beam search (`beam`, default the run's task.beam)."""

    outputs = "structured"  # decoding loops in Python: eager backends only
    settings = {"beam": None}
    draws = True

    def setup(self) -> None:
        if self.options["beam"] is None:
            self.options["beam"] = self.task.options.beam
        if self.options["beam"] < 1:
            raise VisrecError(f"--beam {self.options['beam']} is not valid", "use 1 (greedy) or more")

    def answer(self, items: list[Prepared], outputs: Any, top_k: list[int]) -> list[Answer]:
        model = self.lm.model
        x = self.lm.normalizer(torch.stack([p.x for p in items]).to(self.device))
        tokens, alphas = model.generate(x, beam=self.options["beam"])
        res: list[Answer] = []
        for i, t in enumerate(tokens):
            text = model.decode(t)
            attention = None
            if alphas is not None:
                gh, gw = model.grid
                attention = [{"word": w, "weights": [[round(float(v), 3) for v in row]
                                                     for row in alphas[i, j].view(gh, gw).tolist()]}
                             for j, w in enumerate(text.split())]
            res.append(Caption(text, attention))
        return res


@dataclass
class CaptioningOptions:
    min_word_count: AtLeast1 = 1  # words seen fewer times in training captions become <UNK>
    beam: AtLeast1 = 1  # beam width when evaluating (1 = greedy)
    attention_reg: NonNeg = 1.0  # lstm_attention: weight of the doubly stochastic attention penalty


class CaptioningTask(Task):
    name = "captioning"
    Options = CaptioningOptions
    Predictor = CaptioningPredictor
    # recurrent decoders want Adam, clipped gradients and no flips (a flip turns "left of" into "right of")
    recipe = {"model.name": "lstm_attention", "optim.name": "adam", "optim.lr": 2e-3, "optim.weight_decay": 0.0,
              "optim.grad_clip": 5.0, "schedule.name": "cosine", "schedule.warmup_epochs": 0.3, "data.augment": [],
              "train.batch_size": 64, "train.epochs": 10, "eval.tta": "none", "loss.label_smoothing": 0.0,
              "model.channels_last": "off"}
    sequence_model = True
    random_crops = False  # targets in the images' pixels (or words about them): images read whole
    target = "tokens"
    primary = "bleu4"
    maximize = True
    stats = ("word_acc",)

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.vocab: Vocabulary | None = None
        self.truncated = 0

    # ---------------------------------------------------------------- data and model

    def check(self, ds: Dataset) -> None:
        for split, data in (("train", ds.train), ("val", ds.val), ("test", ds.test)):
            if data is None:
                continue
            caps = (data.targets or {}).get("captions")
            if not caps:
                raise VisrecError(f"task captioning needs captions, and {ds.name} has none in its {split} split",
                                  "use scenes, or a COCO folder with annotations/captions_<split>.json")
            for i, c in enumerate(caps):
                if not c:
                    raise VisrecError(f"{ds.name}: {split} image {i} has no caption",
                                      "give every image at least one caption, or leave the image out")
                if any(not normalize_caption(x) for x in c):
                    raise VisrecError(f"{ds.name}: {split} image {i} has an empty caption (after normalization: "
                                      f"{c!r})", "remove empty captions from the annotations")
        self._build_vocab(ds)

    def _build_vocab(self, ds: Dataset) -> Vocabulary:
        if self.vocab is None:
            self.vocab = Vocabulary.build((c for caps in ds.train.targets["captions"] for c in caps),
                                          self.options.min_word_count)
        return self.vocab

    def num_outputs(self, ds: Dataset) -> int:
        return len(self._build_vocab(ds))

    def model_kwargs(self, ds: Dataset, model_name: str) -> dict[str, Any]:
        from ..models import is_file_model, model_entry

        if is_file_model(model_name) or model_entry(model_name).family != "captioning":
            raise VisrecError(f"{model_name} is not a captioning model",
                              "use one of rnn, lstm, gru, lstm_attention, transformer (visrec models)")
        return {"vocab": self._build_vocab(ds).words, "max_length": self.cfg.data.max_caption_length}

    def check_model(self, model: nn.Module, ds: Dataset) -> None:
        if not getattr(model, "captioner", False):
            raise VisrecError(f"{self.cfg.model.name} is not a captioning model",
                              "use one of rnn, lstm, gru, lstm_attention, transformer (visrec models)")

    def targets(self, data: ImageSet) -> torch.Tensor:
        refs, cut = self.vocab.encode_references(data.targets["captions"], self.cfg.data.max_caption_length)
        self.truncated += cut
        return refs

    # ---------------------------------------------------------------- training

    def forward(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        n_refs = (targets[:, :, 0] != NULL).sum(1).clamp_min(1)  # references each image has
        pick = (torch.rand(len(targets), device=targets.device) * n_refs).long().clamp_max(targets.shape[1] - 1)
        tokens = targets[torch.arange(len(targets), device=targets.device), pick]  # (B, L + 2)
        logits = model(x, tokens[:, :-1])
        core = model.module if hasattr(model, "module") else model  # DistributedDataParallel
        return {"logits": logits, "target": tokens[:, 1:], "alphas": getattr(core, "last_alphas", None)}

    def loss(self, outputs: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        loss = masked_caption_loss(outputs["logits"], outputs["target"])
        alphas = outputs.get("alphas")
        if alphas is not None and self.options.attention_reg > 0:
            loss = loss + self.options.attention_reg * attention_penalty(alphas, (outputs["target"] != NULL).float())
        return loss

    def chance_loss(self, vocabulary: int, targets: torch.Tensor) -> float:
        """The loss of a model that knows nothing (uniform over the words): each reference's words and its <END>,
        times ln(vocabulary), averaged over the images (first references)."""
        words = (targets[:, 0, 1:] != NULL).sum(1).float().mean()
        return float(words) * math.log(vocabulary)

    def batch_stats(self, outputs: dict[str, torch.Tensor], targets: Any) -> torch.Tensor:
        t = outputs["target"]
        valid = t != NULL
        right = ((outputs["logits"].argmax(-1) == t) & valid).sum(1).float() / valid.sum(1).clamp_min(1)
        return right.sum()[None]

    # ---------------------------------------------------------------- evaluation

    def captions(self, model: nn.Module, images: torch.Tensor, normalizer: Normalizer, *, beam: int = 1,
                 batch_size: int = 256) -> tuple[list[str], list[torch.Tensor | None]]:
        """The model's captions of uint8 images (and the attention maps of attention models)."""
        device = next(model.parameters()).device
        out, maps = [], []
        for chunk in images.split(batch_size if beam == 1 else 16):
            tokens, alphas = model.generate(normalizer(chunk.to(device)), beam=beam)
            out += [model.decode(t) for t in tokens]
            maps += list(alphas) if alphas is not None else [None] * len(tokens)
        return out, maps

    def evaluate(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, *, split: str,
                 settings: EvalSettings) -> CaptionEvaluation:
        refs = [[normalize_caption(c) for c in caps] for caps in data.targets["captions"]]
        hyps, _ = self.captions(model, data.images, normalizer, beam=self.options.beam,
                                batch_size=settings.batch_size)
        metrics = {**corpus_bleu(hyps, refs), "cider": cider_d(hyps, refs), **(scene_scores(hyps, refs) or {})}
        metrics["loss"] = self._teacher_forced_loss(model, data, normalizer, settings.batch_size)
        metrics["n"] = len(hyps)
        t = data.targets
        ids = t["image_id"].tolist() if "image_id" in t else None
        return CaptionEvaluation(split, metrics, hyps, refs, ids, t.get("file_name"))

    @torch.no_grad()
    def _teacher_forced_loss(self, model, data: ImageSet, normalizer: Normalizer, batch_size: int) -> float:
        device = next(model.parameters()).device
        refs, _ = self.vocab.encode_references(data.targets["captions"], self.cfg.data.max_caption_length)
        first = refs[:, 0]
        was = model.training
        model.eval()
        total = 0.0
        for x8, t in zip(data.images.split(batch_size), first.split(batch_size), strict=True):
            t = t.to(device)
            total += float(masked_caption_loss(model(normalizer(x8.to(device)), t[:, :-1]), t[:, 1:])) * len(t)
        model.train(was)
        return total / max(1, len(first))

    def summary_fields(self, test: Evaluation | None) -> dict[str, Any]:
        return {"vocabulary": len(self.vocab) if self.vocab else None, "captions_truncated": self.truncated}

    def figures(self, model: nn.Module, data: ImageSet, normalizer: Normalizer, n: int = 8,
                folder: Path | None = None) -> dict[str, bytes]:
        from ..plotting import figure_png, pyplot

        plt = pyplot()
        hyps, maps = self.captions(model, data.images[:n], normalizer)
        refs = data.targets["captions"][:n]
        fig, axes = plt.subplots(1, len(hyps), figsize=(2.6 * len(hyps), 3.4), squeeze=False)
        for ax, img, h, r in zip(axes[0], data.images[:n], hyps, refs, strict=True):
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
            ax.set_title(f"{h}\n(ref: {normalize_caption(r[0])})", fontsize=6, wrap=True)
            ax.axis("off")
        out = {"Captions: the model's caption above, the first reference below it": figure_png(fig)}
        if maps and maps[0] is not None:
            gh, gw = model.grid
            for i in range(min(3, len(hyps))):
                words = hyps[i].split()
                out[f"Attention, test image {i + 1}: where the model looked for each word"] = attention_png(
                    data.images[i], hyps[i], maps[i][:len(words)].view(len(words), gh, gw))
        return out


def attention_png(image: torch.Tensor, caption: str, maps: torch.Tensor | None) -> bytes:
    """The image, then one panel per word with its attention weights (W, h, w) upsampled over the image; or the
    image titled with its caption when the model has no attention."""
    import torch.nn.functional as F  # noqa: N812

    from ..plotting import figure_png, pyplot

    plt = pyplot()
    img = image.permute(1, 2, 0).squeeze(-1).numpy()
    gray = image.shape[0] == 1
    words = caption.split()
    panels = 1 + (len(words) if maps is not None else 0)
    fig, axes = plt.subplots(1, panels, figsize=(2.0 * panels, 2.4), squeeze=False)
    axes[0][0].imshow(img, cmap="gray" if gray else None)
    axes[0][0].set_title(caption if maps is None else "input", fontsize=7)
    if maps is not None:
        up = F.interpolate(maps[:, None].float(), size=img.shape[:2], mode="bilinear", align_corners=False)[:, 0]
        for ax, w, m in zip(axes[0][1:], words, up, strict=True):
            ax.imshow(img, cmap="gray" if gray else None)
            ax.imshow(m.numpy(), cmap="jet", alpha=0.5)
            ax.set_title(w, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    return figure_png(fig)
