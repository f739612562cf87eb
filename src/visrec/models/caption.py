"""Image captioning models: a zoo encoder's feature map, then a decoder over word embeddings.

- `rnn`, `lstm`, `gru`: the pooled image features set the initial hidden state of torch's recurrent layer;
- `lstm_attention`: Show, Attend and Tell: at each word, soft attention over the feature map's positions gives a
  context vector that enters the LSTM cell and the output layer; the attention weights are kept for the doubly
  stochastic penalty and for drawing;
- `transformer`: a decoder with a causal mask and cross-attention to the feature map's positions (learned 2-D
  position embeddings on the image side, learned positions on the word side).

Options: `encoder` (a zoo name) and `encoder_kwargs` (its own options, e.g. the widths of the classification run
whose weights it starts from: `model.weights=RUN` loads that run into the encoder), `freeze_encoder`, `embed`,
`hidden`, `attn`, `heads`, `layers`, `dropout`.

All take the vocabulary in their kwargs (the task sets `vocab` and `max_length` from the training captions, and
the run's config records them), so a run's model decodes to words by itself:

    logits = model(images, tokens_in)              # teacher forcing: (B, T, V)
    tokens, alphas = model.generate(images, beam=5)
    model.decode(tokens[0])                        # "a small shirt left of a bag"
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ..data.text import END, NULL, SPECIALS, START, Vocabulary
from ..errors import VisrecError
from ._registry import create_model, register_model

DECODERS = ("rnn", "lstm", "gru", "lstm_attention", "transformer")


class Captioner(nn.Module):
    """Encoder + decoder; subclasses define `start(feats)` (the decoding state) and `step(state, tokens)`
    -> (logits (B, V), state, alpha or None), and `forward` for teacher forcing."""

    captioner = True
    attention = False

    def __init__(self, encoder: nn.Module, vocab: list[str], max_length: int, embed: int,
                 freeze_encoder: bool = False):
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:  # features as loaded (model.weights=RUN): no gradient, batch norm in eval mode
            for p in encoder.parameters():
                p.requires_grad_(False)
            encoder.eval()
        self.vocab = Vocabulary(vocab)
        self.max_length = max_length
        self.embed = nn.Embedding(len(vocab), embed, padding_idx=NULL)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P, C): the encoder's feature map, one row per position."""
        f = self.encoder.forward_features(images)
        if f.dim() != 4:
            raise VisrecError(f"the caption encoder {type(self.encoder).__name__} gives features of shape "
                              f"{tuple(f.shape)}, not a (B, C, H, W) feature map", "use a convolutional encoder")
        self.grid = tuple(f.shape[2:])  # (h, w): where attention weights lie on the image
        return f.flatten(2).transpose(1, 2)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def train(self, mode: bool = True) -> Captioner:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    # ---------------------------------------------------------------- decoding

    state_batch_dim: dict[str, int] = {}  # the batch dimension of each decoding state tensor (default 0)

    def reorder(self, state: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of the sequences `index` (beam search keeps, drops and copies sequences)."""
        return {k: v.index_select(self.state_batch_dim.get(k, 0), index) for k, v in state.items()}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, *, beam: int = 1, temperature: float | None = None,
                 max_length: int | None = None, length_penalty: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L) token ids (ending with <END> or cut at max_length, <NULL> after) and, for attention models, the
        (B, L, P) attention weights of each word. Greedy by default; `temperature` samples; `beam` > 1 runs beam
        search, ranking finished sequences by log-probability / length^length_penalty."""
        if beam < 1:
            raise VisrecError(f"--beam {beam} is not valid", "use 1 (greedy) or more")
        was = self.training
        self.eval()
        try:
            steps = max_length or self.max_length
            feats = self.features(images)
            if beam == 1:
                return self._greedy(feats, steps, temperature, generator)
            return self._beam(feats, steps, beam, length_penalty)
        finally:
            self.train(was)

    def _greedy(self, feats, steps, temperature, generator):
        b = feats.shape[0]
        state = self.start(feats)
        tok = torch.full((b,), START, dtype=torch.long, device=feats.device)
        out = torch.full((b, steps + 1), NULL, dtype=torch.long, device=feats.device)
        alphas, done = [], torch.zeros(b, dtype=torch.bool, device=feats.device)
        for t in range(steps + 1):
            logits, state, alpha = self.step(state, tok, feats, t)
            if temperature:
                tok = torch.multinomial((logits.float() / temperature).softmax(1), 1, generator=generator)[:, 0]
            else:
                tok = logits.argmax(1)
            if t == steps:
                tok = torch.full_like(tok, END)  # cut: the sequence ends here
            tok = tok.masked_fill(done, NULL)
            out[:, t] = tok
            if alpha is not None:
                alphas.append(alpha)
            done |= tok == END
            if bool(done.all()):
                out = out[:, :t + 1]  # as wide as the longest caption (and its attention maps)
                break
        return out, (torch.stack(alphas, 1) if alphas else None)

    def _beam(self, feats, steps, k, length_penalty):
        b, dev = feats.shape[0], feats.device
        results, result_alphas = [], []
        for i in range(b):  # one image at a time: k hypotheses in a batch
            f = feats[i:i + 1].expand(k, *feats.shape[1:]).contiguous()
            state = self.start(f)
            seqs = torch.full((k, 0), START, dtype=torch.long, device=dev)
            scores = torch.zeros(k, device=dev)
            scores[1:] = -float("inf")  # all beams start identical: keep one
            alpha_hist: list[torch.Tensor] = []
            tok = torch.full((k,), START, dtype=torch.long, device=dev)
            finished: list[tuple[float, torch.Tensor, torch.Tensor | None]] = []
            for t in range(steps + 1):
                logits, state, alpha = self.step(state, tok, f, t)
                logp = logits.float().log_softmax(1)
                if t == steps:  # the last position may only end the caption
                    keep_end = logp[:, END].clone()
                    logp.fill_(-float("inf"))
                    logp[:, END] = keep_end
                logp[:, NULL] = -float("inf")
                cand = (scores[:, None] + logp).flatten()
                top, idx = cand.topk(min(2 * k, cand.numel()))
                src, word = idx // logp.shape[1], idx % logp.shape[1]
                keep_src, keep_word, keep_score = [], [], []
                for s, w, sc in zip(src.tolist(), word.tolist(), top.tolist(), strict=True):
                    if sc == -float("inf"):
                        continue
                    if w == END:
                        seq = torch.cat([seqs[s], torch.tensor([END], device=dev)])
                        a = (torch.stack([h[s] for h in alpha_hist] + [alpha[s]]) if alpha is not None else None)
                        finished.append((sc / (len(seq) ** length_penalty), seq, a))
                    else:
                        keep_src.append(s)
                        keep_word.append(w)
                        keep_score.append(sc)
                    if len(keep_src) == k:
                        break
                best_done = max((x[0] for x in finished), default=-float("inf"))
                if not keep_src or (len(finished) >= k and best_done >= max(
                        sc / ((t + 2) ** length_penalty) for sc in keep_score)):
                    break
                sel = torch.tensor(keep_src, device=dev)
                pad = k - len(keep_src)  # fewer live hypotheses than the width: repeat the last, scored -inf
                if pad:
                    sel = torch.cat([sel, sel[-1:].expand(pad)])
                    keep_word += [keep_word[-1]] * pad
                    keep_score += [-float("inf")] * pad
                seqs = torch.cat([seqs[sel], torch.tensor(keep_word, device=dev)[:, None]], 1)
                scores = torch.tensor(keep_score, device=dev)
                state = self.reorder(state, sel)
                if alpha is not None:
                    alpha_hist = [h[sel] for h in alpha_hist] + [alpha[sel]]
                tok = torch.tensor(keep_word, device=dev)
            _, seq, a = max(finished, key=lambda x: x[0])
            results.append(seq)
            result_alphas.append(a)
        width = max(len(s) for s in results)
        out = torch.full((b, width), NULL, dtype=torch.long, device=dev)
        for i, s in enumerate(results):
            out[i, :len(s)] = s
        if result_alphas[0] is None:
            return out, None
        al = torch.zeros(b, width, feats.shape[1], device=dev)
        for i, a in enumerate(result_alphas):
            al[i, :len(a)] = a
        return out, al


class RecurrentCaptioner(Captioner):
    """rnn / lstm / gru: h0 = tanh(W pooled features); teacher forcing through torch's recurrent layer."""

    state_batch_dim = {"h": 1, "c": 1}

    def __init__(self, kind: str, encoder, channels: int, vocab, max_length, embed: int, hidden: int,
                 dropout: float, freeze_encoder: bool = False):
        super().__init__(encoder, vocab, max_length, embed, freeze_encoder)
        self.kind = kind
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(embed, hidden, batch_first=True)
        self.init_h = nn.Linear(channels, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, len(vocab))

    def start(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.init_h(feats.mean(1)))[None]
        return {"h": h, "c": torch.zeros_like(h)} if self.kind == "lstm" else {"h": h}

    def _run(self, emb: torch.Tensor, state: dict[str, torch.Tensor]):
        if self.kind == "lstm":
            out, (h, c) = self.rnn(emb, (state["h"], state["c"]))
            return out, {"h": h, "c": c}
        out, h = self.rnn(emb, state["h"])
        return out, {"h": h}

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.features(images)
        if tokens is None:  # one step from <START>: the first word's scores (shape checks, summaries)
            tokens = torch.full((images.shape[0], 1), START, dtype=torch.long, device=images.device)
        out, _ = self._run(self.embed(tokens), self.start(feats))
        return self.head(self.drop(out))

    def step(self, state, tok, feats, t):
        out, state = self._run(self.embed(tok)[:, None], state)
        return self.head(out[:, 0]), state, None


class AttentionCaptioner(Captioner):
    """Show, Attend and Tell (soft attention): e_ti = w . tanh(W_f f_i + W_h h_t), alpha_t = softmax(e_t),
    z_t = sum_i alpha_ti f_i; the LSTM cell reads [word embedding, z_t] and the output layer [h_t, z_t]."""

    attention = True

    def __init__(self, encoder, channels: int, vocab, max_length, embed: int, hidden: int, attn: int,
                 dropout: float, freeze_encoder: bool = False):
        super().__init__(encoder, vocab, max_length, embed, freeze_encoder)
        self.init_h, self.init_c = nn.Linear(channels, hidden), nn.Linear(channels, hidden)
        self.att_f, self.att_h, self.att_v = nn.Linear(channels, attn), nn.Linear(hidden, attn), nn.Linear(attn, 1)
        self.cell = nn.LSTMCell(embed + channels, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden + channels, len(vocab))
        self.last_alphas: torch.Tensor | None = None

    def start(self, feats):
        m = feats.mean(1)
        return {"h": torch.tanh(self.init_h(m)), "c": torch.tanh(self.init_c(m)), "pf": self.att_f(feats)}

    def step(self, state, tok, feats, t):
        e = self.att_v(torch.tanh(state["pf"] + self.att_h(state["h"])[:, None]))[..., 0]  # (B, P)
        alpha = e.softmax(1)
        z = (alpha[..., None] * feats).sum(1)
        h, c = self.cell(torch.cat([self.embed(tok), z], 1), (state["h"], state["c"]))
        logits = self.head(self.drop(torch.cat([h, z], 1)))
        return logits, {"h": h, "c": c, "pf": state["pf"]}, alpha

    def forward(self, images, tokens=None):
        feats = self.features(images)
        if tokens is None:
            tokens = torch.full((images.shape[0], 1), START, dtype=torch.long, device=images.device)
        state, outs, alphas = self.start(feats), [], []
        for t in range(tokens.shape[1]):
            logits, state, alpha = self.step(state, tokens[:, t], feats, t)
            outs.append(logits)
            alphas.append(alpha)
        self.last_alphas = torch.stack(alphas, 1)  # (B, T, P): for the doubly stochastic penalty
        return torch.stack(outs, 1)


class TransformerCaptioner(Captioner):
    """A transformer decoder: causal self-attention over the words so far, cross-attention to the image."""

    def __init__(self, encoder, channels: int, positions: int, vocab, max_length, width: int, heads: int,
                 layers: int, dropout: float, freeze_encoder: bool = False):
        super().__init__(encoder, vocab, max_length, width, freeze_encoder)
        self.proj = nn.Linear(channels, width)
        self.img_pos = nn.Parameter(torch.zeros(1, positions, width))
        self.word_pos = nn.Parameter(torch.zeros(1, max_length + 2, width))
        nn.init.normal_(self.img_pos, std=0.02)
        nn.init.normal_(self.word_pos, std=0.02)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(vocab))

    def _memory(self, feats):
        if feats.shape[1] != self.img_pos.shape[1]:
            raise VisrecError(f"the transformer captioner was built for {self.img_pos.shape[1]} feature positions, "
                              f"got {feats.shape[1]}", "feed images of the training size")
        return self.proj(feats) + self.img_pos

    def _decode(self, tokens, memory):
        t = tokens.shape[1]
        x = self.embed(tokens) * math.sqrt(self.embed.embedding_dim) + self.word_pos[:, :t]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), 1)  # True: may not attend
        return self.head(self.norm(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True,
                                                tgt_key_padding_mask=tokens == NULL)))

    def forward(self, images, tokens=None):
        feats = self.features(images)
        if tokens is None:
            tokens = torch.full((images.shape[0], 1), START, dtype=torch.long, device=images.device)
        return self._decode(tokens, self._memory(feats))

    def start(self, feats):
        return {"memory": self._memory(feats), "prefix": feats.new_zeros((feats.shape[0], 0), dtype=torch.long)}

    def step(self, state, tok, feats, t):
        prefix = torch.cat([state["prefix"], tok[:, None]], 1)
        logits = self._decode(prefix, state["memory"])[:, -1]
        return logits, {"memory": state["memory"], "prefix": prefix}, None


def _encoder(name: str, in_chans: int, image_size: tuple[int, int], kwargs: dict | None = None
             ) -> tuple[nn.Module, int, int]:
    kwargs = dict(kwargs or {})
    enc = create_model(name, in_chans=in_chans, num_classes=1, image_size=image_size, **kwargs)
    if not hasattr(enc, "forward_features"):
        raise VisrecError(f"model.kwargs.encoder={name} has no feature map to caption from",
                          "use a zoo convolutional network (convnet, resnet18, ...)")
    with torch.device("meta"):
        probe = create_model(name, in_chans=in_chans, num_classes=1, image_size=image_size, check_size=False,
                             **kwargs)
        f = probe.forward_features(torch.empty(1, in_chans, *image_size))
    if f.dim() != 4:
        raise VisrecError(f"model.kwargs.encoder={name} gives features of shape {tuple(f.shape)}, not a feature map",
                          "use a zoo convolutional network (convnet, resnet18, ...)")
    return enc, f.shape[1], f.shape[2] * f.shape[3]


def _check_vocab(vocab: Any, name: str, size: int) -> list[str]:
    """The task's vocabulary; without one (a summary of the architecture) placeholder words of the head's size."""
    if vocab:
        return list(vocab)
    if size <= len(SPECIALS):
        raise VisrecError(f"model {name} is a captioning model: it needs a vocabulary of more than "
                          f"{len(SPECIALS)} words", "train it with --task captioning on data with captions (scenes, "
                          "coco:PATH)")
    return SPECIALS + [f"word{i}" for i in range(size - len(SPECIALS))]


def _register(kind: str):
    def build(*, in_chans: int, num_classes: int, image_size: tuple[int, int], vocab: list[str] | None = None,
              max_length: int = 20, encoder: str = "convnet", embed: int = 128, hidden: int = 256,
              attn: int = 128, heads: int = 4, layers: int = 2, dropout: float = 0.1,
              freeze_encoder: bool = False, encoder_kwargs: dict | None = None) -> nn.Module:
        words = _check_vocab(vocab, kind, num_classes)
        if len(words) != num_classes:
            raise VisrecError(f"{kind}: a vocabulary of {len(words)} words for a head of {num_classes}")
        enc, channels, positions = _encoder(encoder, in_chans, image_size, encoder_kwargs)
        if kind == "lstm_attention":
            return AttentionCaptioner(enc, channels, words, max_length, embed, hidden, attn, dropout, freeze_encoder)
        if kind == "transformer":
            if embed % heads:
                raise VisrecError(f"model.kwargs.embed={embed} must divide into heads={heads}")
            return TransformerCaptioner(enc, channels, positions, words, max_length, embed, heads, layers, dropout,
                                        freeze_encoder)
        return RecurrentCaptioner(kind, enc, channels, words, max_length, embed, hidden, dropout, freeze_encoder)

    build.__name__ = kind
    build.__doc__ = {"rnn": "Captioning: vanilla RNN decoder, the image sets its initial state.",
                     "lstm": "Captioning: LSTM decoder, the image sets its initial state.",
                     "gru": "Captioning: GRU decoder, the image sets its initial state.",
                     "lstm_attention": "Captioning: LSTM with soft attention over the feature map (Show, Attend "
                                       "and Tell).",
                     "transformer": "Captioning: transformer decoder with cross-attention to the feature map."}[kind]
    register_model(build, family="captioning")


for _kind in DECODERS:
    _register(_kind)


def attention_penalty(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Show-Attend-Tell's doubly stochastic regularizer, (1 - sum over words of alpha_ti)^2, here averaged over the
    positions i and the batch (the paper sums over positions: with 256 positions and 15 words that sum is a
    large constant whose gradient flattens every attention map), words past the caption's end excluded by
    `mask` (B, T)."""
    cover = (alphas * mask[..., None]).sum(1)
    return ((1 - cover) ** 2).mean()


def masked_caption_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The temporal softmax loss: cross-entropy summed over the words that are not <NULL>, averaged over the
    batch (the course's convention)."""
    b = logits.shape[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=NULL,
                           reduction="sum") / b
