"""Explicit, tractable density: PixelCNN, Gated PixelCNN (van den Oord et al. 2016) and PixelRNN's Row LSTM, a
256-way softmax per pixel and channel, channels in order."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ...errors import VisrecError
from .._registry import register_model
from .base import LN2, GenerativeModel, _check, _size, _to_unit


def channel_groups(n: int, channels: int, parts: int = 1) -> torch.Tensor:
    """The data channel (0..channels-1) each of `n` features belongs to: in each of `parts` equal parts of the
    features, contiguous blocks of n/parts/channels features per channel."""
    per = n // parts
    if per * parts != n or per < channels:
        raise VisrecError(f"{n} features cannot be split into {parts} part(s) of {channels} channel groups",
                          f"use a width that is a multiple of {parts * channels}")
    return ((torch.arange(n) % per) * channels) // per


def autoregressive_mask(kh: int, kw: int, gin: torch.Tensor, gout: torch.Tensor, kind: str,
                        full_rows: bool = True) -> torch.Tensor:
    """A (out, in, kh, kw) mask: rows above the centre (all of them, or none with `full_rows=False`), the centre row
    left of the centre, and at the centre the input channel groups before (type A) or up to (type B) the output's."""
    m = torch.zeros(len(gout), len(gin), kh, kw)
    ch, cw = kh // 2, kw // 2
    if full_rows:
        m[:, :, :ch, :] = 1
    m[:, :, ch, :cw] = 1
    centre = gin[None, :] < gout[:, None] if kind == "A" else gin[None, :] <= gout[:, None]
    m[:, :, ch, cw] = centre.float()
    return m


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only earlier pixels (and earlier channels of the current pixel: see
    `autoregressive_mask`); padding keeps the size."""

    def __init__(self, cin: int, cout: int, k: int | tuple[int, int], kind: str, channels: int, *,
                 gin: torch.Tensor | None = None, gout: torch.Tensor | None = None, full_rows: bool = True):
        kh, kw = (k, k) if isinstance(k, int) else k
        super().__init__(cin, cout, (kh, kw), padding=(kh // 2, kw // 2))
        gin = channel_groups(cin, channels) if gin is None else gin
        gout = channel_groups(cout, channels) if gout is None else gout
        self.register_buffer("mask", autoregressive_mask(kh, kw, gin, gout, kind, full_rows), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class AutoregressiveModel(GenerativeModel):
    """A network whose output at pixel (i, j), channel c depends only on earlier pixels and channels; trained by
    the 256-way cross-entropy, sampled one pixel and channel at a time."""

    kind = "autoregressive"
    likelihood = True
    stats = ("bpd",)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) 0..255 -> the features the output layers read, (N, F, H, W)."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Features (N, F, H, W) -> logits (N, 256, C, H, W): per-pixel (1x1) layers."""
        n, _, hh, ww = h.shape
        return self.out(h).view(n, self.in_chans, 256, hh, ww).transpose(1, 2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) 0..255 -> (N, 256, C, H, W)."""
        return self.head(self.trunk(x))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per image (N,)."""
        target = x.round().long().clamp(0, 255)
        return F.cross_entropy(self.logits(x), target, reduction="none").flatten(1).sum(1)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        return self.nll(x) / (x[0].numel() * LN2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bpd = self.bits_per_dim(x)
        return {"loss": bpd.mean(), "bpd": bpd.detach()}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None,
               batch_size: int = 256) -> torch.Tensor:
        """Pixel by pixel, channel by channel: H·W·C network passes. Rows below the current one cannot change the
        output, so each pass runs the trunk on the rows up to the current one only (about half the work), and the
        output layers, which are per pixel, on the current pixel only."""
        c, h, w = self.in_chans, *self.image_size
        out = []
        dev = self.device
        for start in range(0, n, batch_size):
            x = torch.zeros(min(batch_size, n - start), c, h, w, device=dev)
            for i in range(h):
                for j in range(w):
                    for k in range(c):
                        h = self.trunk(x[:, :, : i + 1])[:, :, i: i + 1, j: j + 1]
                        probs = self.head(h)[:, :, k, 0, 0].float().softmax(1)
                        x[:, k, i, j] = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(dev).float()
            out.append(x.byte().cpu())
        return torch.cat(out)


class PixelCNN(AutoregressiveModel):
    """A 7x7 type-A masked convolution, residual blocks of masked 1x1-3x3-1x1 type-B convolutions, and two 1x1
    output layers to 256 logits per channel."""

    def __init__(self, in_chans: int, image_size, *, width: int = 64, blocks: int = 6):
        super().__init__(in_chans, image_size)
        c = in_chans
        w = width - width % (2 * c)
        self.inp = MaskedConv2d(c, w, 7, "A", c)
        self.blocks = nn.ModuleList([nn.Sequential(nn.ReLU(), MaskedConv2d(w, w // 2, 1, "B", c), nn.ReLU(),
                                                   MaskedConv2d(w // 2, w // 2, 3, "B", c), nn.ReLU(),
                                                   MaskedConv2d(w // 2, w, 1, "B", c)) for _ in range(blocks)])
        self.out = nn.Sequential(nn.ReLU(), MaskedConv2d(w, w, 1, "B", c), nn.ReLU(),
                                 MaskedConv2d(w, 256 * c, 1, "B", c))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(_to_unit(x))
        for b in self.blocks:
            h = h + b(h)
        return h


class GatedLayer(nn.Module):
    """A gated layer of the Gated PixelCNN: a vertical stack (the rows above) and a horizontal stack (the current
    row to the left), tanh x sigmoid gates, the vertical stack fed to the horizontal one shifted down a row."""

    def __init__(self, w: int, k: int, c: int, kind: str):
        super().__init__()
        g = channel_groups(w, c)
        g2 = channel_groups(2 * w, c, parts=2)
        self.v = nn.Conv2d(w, 2 * w, (k // 2 + 1, k), padding=0)
        self.k = k
        self.v_to_h = MaskedConv2d(2 * w, 2 * w, 1, "B", c, gin=g2, gout=g2)
        self.v_to_h.mask.fill_(1.0)  # rows above only (it is shifted): every channel may be seen
        self.h = MaskedConv2d(w, 2 * w, (1, k), kind, c, gin=g, gout=g2, full_rows=False)
        self.h_out = MaskedConv2d(w, w, 1, "B", c, gin=g, gout=g)
        self.residual = kind == "B"

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k
        vf = self.v(F.pad(v, (k // 2, k // 2, k // 2, 0)))  # rows up to and including the current one
        shifted = F.pad(vf, (0, 0, 1, 0))[:, :, :-1]  # now strictly above
        hf = self.h(h) + self.v_to_h(shifted)
        v_new = torch.tanh(vf[:, : vf.shape[1] // 2]) * torch.sigmoid(vf[:, vf.shape[1] // 2:])
        h_gated = torch.tanh(hf[:, : hf.shape[1] // 2]) * torch.sigmoid(hf[:, hf.shape[1] // 2:])
        h_new = self.h_out(h_gated)
        return v_new, (h + h_new if self.residual else h_new)


class GatedPixelCNN(AutoregressiveModel):
    """Gated PixelCNN: vertical and horizontal stacks (no blind spot), gated activations, residual horizontal
    stack; the first layer is type A."""

    def __init__(self, in_chans: int, image_size, *, width: int = 64, layers: int = 8, kernel: int = 5):
        super().__init__(in_chans, image_size)
        c = in_chans
        w = width - width % (2 * c)
        self.embed = MaskedConv2d(c, w, 1, "B", c)  # per-pixel lift; the type-A layer after it hides the pixel
        self.embed_v = nn.Conv2d(c, w, 1)  # the vertical stack holds rows up to the current; it reaches the
        # horizontal stack shifted down a row
        self.layers = nn.ModuleList([GatedLayer(w, 7 if i == 0 else kernel, c, "A" if i == 0 else "B")
                                     for i in range(layers)])
        self.out = nn.Sequential(nn.ReLU(), MaskedConv2d(w, w, 1, "B", c), nn.ReLU(),
                                 MaskedConv2d(w, 256 * c, 1, "B", c))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        u = _to_unit(x)
        v = self.embed_v(u)
        h = self.embed(u)
        for layer in self.layers:
            v, h = layer(v, h)
        return h


class RowLSTM(AutoregressiveModel):
    """PixelRNN's Row LSTM, one layer: a masked 1xk input-to-state convolution along the row and a 1x3
    state-to-state convolution over the previous row's hidden state, so rows are computed one after another."""

    def __init__(self, in_chans: int, image_size, *, width: int = 64, kernel: int = 3):
        super().__init__(in_chans, image_size)
        c = in_chans
        w = width - width % (2 * c)
        self.w = w
        g4 = channel_groups(4 * w, c, parts=4)
        self.inp = MaskedConv2d(c, 4 * w, (1, kernel), "A", c, gin=channel_groups(c, c), gout=g4, full_rows=False)
        self.state = nn.Conv1d(w, 4 * w, 3, padding=1)
        self.out = nn.Sequential(nn.ReLU(), MaskedConv2d(w, w, 1, "B", c), nn.ReLU(),
                                 MaskedConv2d(w, 256 * c, 1, "B", c))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        n, _, hh, ww = x.shape
        gates_in = self.inp(_to_unit(x))  # (N, 4w, H, W)
        h = x.new_zeros(n, self.w, ww)
        cell = x.new_zeros(n, self.w, ww)
        rows = []
        for i in range(hh):
            # the state at row i comes from row i-1's hidden state, so row i's pixels stay unseen
            z = gates_in[:, :, i] + self.state(h)
            ig, fg, og, gg = z.chunk(4, 1)
            cell = torch.sigmoid(fg) * cell + torch.sigmoid(ig) * torch.tanh(gg)
            h_row = torch.sigmoid(og) * torch.tanh(cell)
            rows.append(h_row)
            h = h_row
        return torch.stack(rows, 2)  # (N, w, H, W)


@register_model(family="generative")
def pixelcnn(in_chans: int = 1, num_classes: int = 1, image_size=None, *, width: int = 64,
             blocks: int = 6) -> nn.Module:
    """PixelCNN (van den Oord et al. 2016): masked convolutions, a 256-way softmax per pixel and channel."""
    _check(in_chans, num_classes, "pixelcnn")
    return PixelCNN(in_chans, _size(image_size), width=width, blocks=blocks)


@register_model(family="generative")
def gated_pixelcnn(in_chans: int = 1, num_classes: int = 1, image_size=None, *, width: int = 64, layers: int = 8,
                   kernel: int = 5) -> nn.Module:
    """Gated PixelCNN: vertical and horizontal stacks without a blind spot, tanh x sigmoid gates."""
    _check(in_chans, num_classes, "gated_pixelcnn")
    return GatedPixelCNN(in_chans, _size(image_size), width=width, layers=layers, kernel=kernel)


@register_model(family="generative")
def row_lstm(in_chans: int = 1, num_classes: int = 1, image_size=None, *, width: int = 64,
             kernel: int = 3) -> nn.Module:
    """PixelRNN's Row LSTM (one layer): rows computed one after another."""
    _check(in_chans, num_classes, "row_lstm")
    return RowLSTM(in_chans, _size(image_size), width=width, kernel=kernel)
