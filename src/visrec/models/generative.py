"""Generative models of images, one per branch of the course's taxonomy, each trained through visrec's loop.

    explicit, tractable density   pixelcnn, gated_pixelcnn (van den Oord et al. 2016) and row_lstm (PixelRNN's Row
                                  LSTM): a 256-way softmax per pixel and channel, channels in order (R, then G
                                  given R, then B given both)
    approximate density           vae (Kingma and Welling 2014): Gaussian encoder, reparameterization, a Bernoulli
                                  decoder on binarized images or a discretized logistic one on 8-bit images
    implicit density              dcgan (non-saturating loss) and wgan_gp (Wasserstein loss, gradient penalty 10,
                                  five critic steps per generator step)
    diffusion                     ddpm (Ho et al. 2020): a small U-Net predicts the noise; ancestral sampling over
                                  all T steps or DDIM (Song et al. 2021) in fewer

Every model takes images as floats 0..255 (N, C, H, W) — the task trains with `data.normalize=none` — and offers
`forward(x)` -> {"loss": scalar, stats...} (the training objective; called through the module so distributed
training sees it), `sample(n, generator=..., steps=...)` -> uint8 images, and, for likelihood models,
`bits_per_dim(x)` -> (N,) (exact for the autoregressive models; for the VAE the negative ELBO, a bound).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from ..errors import VisrecError
from ._registry import register_model

LN2 = math.log(2.0)


def _size(image_size) -> tuple[int, int]:
    if image_size is None:
        return (28, 28)
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


class GenerativeModel(nn.Module):
    generative = True
    kind = ""  # autoregressive | vae | gan | diffusion
    likelihood = False
    stats: tuple[str, ...] = ()

    def __init__(self, in_chans: int, image_size: tuple[int, int]):
        super().__init__()
        self.in_chans, self.image_size = in_chans, tuple(image_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        raise VisrecError(f"{type(self).__name__} has no likelihood: bits per dimension are for pixelcnn, "
                          "gated_pixelcnn, row_lstm and vae", "judge a GAN or a DDPM by FID and KID (visrec eval RUN)")


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x / 127.5 - 1.0


# ---------------------------------------------------------------------------------------- autoregressive


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


# ---------------------------------------------------------------------------------------- VAE


def _up_to(h: int) -> int:
    return (h + 3) // 4


class VAE(GenerativeModel):
    """Convolutional VAE. `likelihood`: `bernoulli` models binarized images (pixel on with probability value/255:
    resampled every step in training; evaluation binarizes with a fixed seed, so every evaluation sees the same
    bits) or `logistic`, a discretized logistic per pixel and channel on the 8-bit values."""

    kind = "vae"
    likelihood = True
    stats = ("recon", "kl")

    def __init__(self, in_chans: int, image_size, *, latent: int = 16, width: int = 32,
                 likelihood: str = "bernoulli"):
        super().__init__(in_chans, image_size)
        if likelihood not in ("bernoulli", "logistic"):
            raise VisrecError(f"vae likelihood {likelihood!r} is not valid", "use bernoulli or logistic")
        self.latent, self.decoder_likelihood = latent, likelihood
        h, w = self.image_size
        self.grid = (_up_to(h), _up_to(w))
        c, wd = in_chans, width
        self.enc = nn.Sequential(nn.Conv2d(c, wd, 4, 2, 1), nn.ReLU(), nn.Conv2d(wd, 2 * wd, 4, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(self.grid), nn.Flatten())
        flat = 2 * wd * self.grid[0] * self.grid[1]
        self.mu, self.logvar = nn.Linear(flat, latent), nn.Linear(flat, latent)
        self.dec_in = nn.Linear(latent, flat)
        out = c if likelihood == "bernoulli" else 2 * c
        self.dec = nn.Sequential(nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(2 * wd, wd, 3, padding=1),
                                 nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(wd, out, 3, padding=1))
        self._wd = wd

    def binarize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(x.shape, generator=generator).to(x.device) if generator is not None else torch.rand_like(x)
        return (u < x / 255.0).float()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc(x / 127.5 - 1.0 if self.decoder_likelihood == "logistic" else x * 2.0 - 1.0)
        return self.mu(h), self.logvar(h).clamp(-12, 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dec_in(z).view(len(z), 2 * self._wd, *self.grid)
        return self.dec(h)[:, :, : self.image_size[0], : self.image_size[1]]

    def log_px(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per image (N,): x is the binarized image (bernoulli) or 0..255 (logistic)."""
        if self.decoder_likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)
        c = self.in_chans
        mean, log_s = params[:, :c], params[:, c:].clamp(-7, 5)
        y = x / 127.5 - 1.0  # bins of width 2/255 centred on the values
        inv = torch.exp(-log_s)
        plus, minus = inv * (y - mean + 1 / 255), inv * (y - mean - 1 / 255)
        cdf_plus, cdf_minus = torch.sigmoid(plus), torch.sigmoid(minus)
        log_cdf_plus = plus - F.softplus(plus)  # the lowest bin takes everything below
        log_one_minus_cdf_minus = -F.softplus(minus)  # the highest bin everything above
        mid = torch.log((cdf_plus - cdf_minus).clamp_min(1e-12))
        lp = torch.where(x < 0.5, log_cdf_plus, torch.where(x > 254.5, log_one_minus_cdf_minus, mid))
        return lp.flatten(1).sum(1)

    def elbo(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ELBO, reconstruction log-likelihood, KL) per image, in nats; `x` the encoder's input, `target` what the
        decoder scores (the binarized image, or x itself)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # the reparameterization trick
        rec = self.log_px(self.decode(z), target)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return rec - kl, rec, kl

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.binarize(x, generator) if self.decoder_likelihood == "bernoulli" else x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.prepare(x)
        elbo, rec, kl = self.elbo(t, t)
        d = x[0].numel() * LN2
        return {"loss": (-elbo).mean() / d, "recon": (-rec).detach() / d, "kl": kl.detach() / d}

    def bits_per_dim(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The negative ELBO in bits per dimension (an upper bound on the true value)."""
        t = self.prepare(x, generator)
        return -self.elbo(t, t)[0] / (x[0].numel() * LN2)

    @torch.no_grad()
    def importance_nll(self, x: torch.Tensor, k: int = 500, chunk: int = 100) -> torch.Tensor:
        """-log p(x) per image in nats, estimated with `k` importance samples from q(z|x) (Burda et al. 2016):
        log mean_k p(x, z_k) / q(z_k | x). `x` as the decoder scores it (binarized, or 8-bit)."""
        mu, logvar = self.encode(x)
        std = torch.exp(0.5 * logvar)
        terms = []
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            eps = torch.randn(m, *mu.shape, device=mu.device)
            z = mu + eps * std  # (m, N, d)
            log_q = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_p = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
            params = self.decode(z.flatten(0, 1))
            rep = x.unsqueeze(0).expand(m, *x.shape).flatten(0, 1)
            log_px = self.log_px(params, rep).view(m, -1)
            terms.append(log_px + log_p - log_q)
        w = torch.cat(terms)
        return -(torch.logsumexp(w, 0) - math.log(k))

    @torch.no_grad()
    def images(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder outputs as uint8 images: the Bernoulli means, or the logistic means."""
        if self.decoder_likelihood == "bernoulli":
            return (torch.sigmoid(params) * 255).round().byte()
        return ((params[:, : self.in_chans].clamp(-1, 1) + 1) * 127.5).round().byte()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None,
               batch_size: int = 256) -> torch.Tensor:
        z = torch.randn(n, self.latent, generator=generator).to(self.device)
        return torch.cat([self.images(self.decode(c)).cpu() for c in z.split(batch_size)])


# ---------------------------------------------------------------------------------------- GANs


class Generator(nn.Module):
    def __init__(self, c: int, image_size: tuple[int, int], nz: int, w: int):
        super().__init__()
        self.grid, self.image_size, self.w = (_up_to(image_size[0]), _up_to(image_size[1])), image_size, w
        self.fc = nn.Sequential(nn.Linear(nz, 4 * w * self.grid[0] * self.grid[1]), nn.BatchNorm1d(
            4 * w * self.grid[0] * self.grid[1]), nn.ReLU())
        self.net = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                                 nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.BatchNorm2d(w), nn.ReLU(),
                                 nn.Conv2d(w, c, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(len(z), 4 * self.w, *self.grid)
        return (self.net(h)[:, :, : self.image_size[0], : self.image_size[1]] + 1.0) * 127.5  # 0..255


class Critic(nn.Module):
    def __init__(self, c: int, image_size: tuple[int, int], w: int, norm: bool):
        super().__init__()
        g = (_up_to(image_size[0]), _up_to(image_size[1]))
        self.net = nn.Sequential(nn.Conv2d(c, w, 4, 2, 1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(w, 2 * w, 4, 2, 1), nn.BatchNorm2d(2 * w) if norm else nn.Identity(),
                                 nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(g), nn.Flatten(),
                                 nn.Linear(2 * w * g[0] * g[1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 127.5 - 1.0)[:, 0]


class GAN(GenerativeModel):
    """A generator and a discriminator (critic) in one module. Trained jointly (one optimizer), each step's loss is
    the discriminator's plus the generator's, the generator's taken through a copy of the discriminator's weights
    that carries no gradient, so each network follows only its own loss; `n_critic` > 1 leaves the generator out
    of all but every n-th step (its gradients stay None, so the optimizer does not move it). Trained alternately
    (task.gan_update=alternating: the generate task's step, two optimizers), `forward(x, "critic")` and
    `forward(x, "generator")` give each network's loss for its own optimizer."""

    kind = "gan"
    stats = ("d_loss", "g_loss", "d_acc")

    def __init__(self, in_chans: int, image_size, *, loss: str, latent: int = 64, width: int = 64,
                 n_critic: int = 1, gp: float = 10.0):
        super().__init__(in_chans, image_size)
        self.loss_kind, self.latent, self.n_critic, self.gp = loss, latent, n_critic, gp
        self.generator = Generator(in_chans, self.image_size, latent, width)
        self.critic = Critic(in_chans, self.image_size, width, norm=loss == "non_saturating")
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # saved: a resumed run keeps the rhythm

    def _frozen_critic(self, x: torch.Tensor) -> torch.Tensor:
        params = {k: v.detach() for k, v in self.critic.named_parameters()}
        return functional_call(self.critic, {**params, **dict(self.critic.named_buffers())}, (x,))

    def forward(self, x: torch.Tensor, mode: str = "joint") -> dict[str, torch.Tensor]:
        """`joint`: the critic's and the generator's losses of one simultaneous step (module doc); `critic`: the
        critic's loss alone, on `x` and fresh samples; `generator`: the generator's loss through the critic as it is
        now (for alternating updates with two optimizers, the caller counting `steps`)."""
        if mode == "critic":
            return self._critic_loss(x)
        if mode == "generator":
            return self._generator_loss(len(x), x.device)
        n = len(x)
        g_step = int(self.steps) % self.n_critic == 0
        if self.training:
            self.steps += 1
        z = torch.randn(n, self.latent, device=x.device)
        if g_step:
            fake = self.generator(z)
        else:
            with torch.no_grad():
                fake = self.generator(z)
        real_score, fake_score = self.critic(x), self.critic(fake.detach())
        if self.loss_kind == "non_saturating":
            d_loss = F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
        else:
            d_loss = fake_score.mean() - real_score.mean()
            if self.gp and torch.is_grad_enabled():
                d_loss = d_loss + self.gp * self.gradient_penalty(x, fake.detach())
        loss = d_loss
        g_loss = torch.zeros((), device=x.device)
        if g_step:
            score = self._frozen_critic(fake)
            g_loss = F.softplus(-score).mean() if self.loss_kind == "non_saturating" else -score.mean()
            loss = loss + g_loss
        acc = ((real_score > 0).float().mean() + (fake_score < 0).float().mean()) / 2 \
            if self.loss_kind == "non_saturating" else (real_score > fake_score.mean()).float().mean()
        ones = torch.ones(n, device=x.device)
        return {"loss": loss, "d_loss": d_loss.detach() * ones, "g_loss": g_loss.detach() * ones,
                "d_acc": acc.detach() * ones}

    def _critic_loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            fake = self.generator(torch.randn(len(x), self.latent, device=x.device))
        real_score, fake_score = self.critic(x), self.critic(fake)
        if self.loss_kind == "non_saturating":
            d_loss = F.softplus(-real_score).mean() + F.softplus(fake_score).mean()
            acc = ((real_score > 0).float().mean() + (fake_score < 0).float().mean()) / 2
        else:
            d_loss = fake_score.mean() - real_score.mean()
            if self.gp and torch.is_grad_enabled():
                d_loss = d_loss + self.gp * self.gradient_penalty(x, fake)
            acc = (real_score > fake_score.mean()).float().mean()
        ones = torch.ones(len(x), device=x.device)
        return {"loss": d_loss, "d_loss": d_loss.detach() * ones, "d_acc": acc.detach() * ones}

    def _generator_loss(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        score = self.critic(self.generator(torch.randn(n, self.latent, device=device)))
        g_loss = F.softplus(-score).mean() if self.loss_kind == "non_saturating" else -score.mean()
        return {"loss": g_loss, "g_loss": g_loss.detach() * torch.ones(n, device=device)}

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """(||grad of the critic at a random interpolate|| - 1)^2 (Gulrajani et al. 2017), gradients in the critic's
        input units (pixels scaled to -1..1)."""
        a = torch.rand(len(real), 1, 1, 1, device=real.device)
        mix = (a * real + (1 - a) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.critic(mix).sum(), mix, create_graph=True)
        return ((grad.flatten(1).norm(dim=1) * 127.5 - 1.0) ** 2).mean()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None,
               batch_size: int = 256) -> torch.Tensor:
        was = self.generator.training
        self.generator.eval()
        z = torch.randn(n, self.latent, generator=generator).to(self.device)
        out = torch.cat([self.generator(c).round().clamp(0, 255).byte().cpu() for c in z.split(batch_size)])
        self.generator.train(was)
        return out

    @torch.no_grad()
    def critic_accuracy(self, real: torch.Tensor, generator: torch.Generator | None = None) -> float:
        """The share of real images scored as real and of samples scored as fake."""
        was = self.training
        self.eval()
        fake = self.sample(len(real), generator=generator).to(real.device).float()
        r, f = self.critic(real.float()), self.critic(fake)
        self.train(was)
        if self.loss_kind == "non_saturating":
            return float(((r > 0).float().mean() + (f < 0).float().mean()) / 2)
        thr = (r.mean() + f.mean()) / 2
        return float(((r > thr).float().mean() + (f < thr).float().mean()) / 2)


# ---------------------------------------------------------------------------------------- diffusion


def noise_schedule(kind: str, steps: int) -> torch.Tensor:
    """The betas: `linear` 1e-4..0.02 for 1000 steps (Ho et al.; scaled by 1000/steps for other lengths, as
    Nichol and Dhariwal do, so the chain still ends in noise) or `cosine` (Nichol and Dhariwal 2021, clipped at
    0.999)."""
    if kind == "linear":
        scale = 1000.0 / steps
        return torch.linspace(1e-4 * scale, min(0.999, 0.02 * scale), steps, dtype=torch.float64)
    if kind == "cosine":
        t = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise VisrecError(f"noise schedule {kind!r} is not valid", "use linear or cosine")


class _TimeEmbed(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, 4 * d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.d // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        a = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([a.sin(), a.cos()], 1))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(tdim, cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.t(t)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class SmallUNet(nn.Module):
    """Two resolutions down and up, residual blocks with GroupNorm and a time embedding added to each."""

    def __init__(self, c: int, w: int = 32):
        super().__init__()
        td = 4 * w
        self.time = _TimeEmbed(w)
        self.inp = nn.Conv2d(c, w, 3, padding=1)
        self.d1, self.d2 = _ResBlock(w, w, td), _ResBlock(w, 2 * w, td)
        self.mid = _ResBlock(2 * w, 2 * w, td)
        self.u2, self.u1 = _ResBlock(4 * w, w, td), _ResBlock(2 * w, w, td)
        self.out = nn.Sequential(nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, c, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        te = self.time(t)
        h0 = self.d1(self.inp(x), te)  # full size
        h1 = self.d2(F.avg_pool2d(h0, 2, ceil_mode=True), te)  # half
        m = self.mid(F.avg_pool2d(h1, 2, ceil_mode=True), te)  # quarter
        u = F.interpolate(m, size=h1.shape[-2:], mode="nearest")
        u = self.u2(torch.cat([u, h1], 1), te)
        u = F.interpolate(u, size=h0.shape[-2:], mode="nearest")
        return self.out(self.u1(torch.cat([u, h0], 1), te))


class DDPM(GenerativeModel):
    """Denoising diffusion: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with x_0 the image scaled to -1..1; the
    U-Net predicts eps; the loss is the mean squared error at a uniformly drawn t (Ho et al.'s simple loss)."""

    kind = "diffusion"
    stats = ()

    def __init__(self, in_chans: int, image_size, *, width: int = 32, timesteps: int = 1000,
                 schedule: str = "linear"):
        super().__init__(in_chans, image_size)
        self.net = SmallUNet(in_chans, width)
        self.timesteps, self.schedule = timesteps, schedule
        betas = noise_schedule(schedule, timesteps)
        abar = torch.cumprod(1 - betas, 0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("abar", abar.float(), persistent=False)

    def loss_at(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noise-prediction error per image (N,) at steps `t` (0-based) with the given noise; x0 in -1..1."""
        a = self.abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return (self.net(xt, t) - noise).pow(2).flatten(1).mean(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = _to_unit(x)
        t = torch.randint(0, self.timesteps, (len(x),), device=x.device)
        return {"loss": self.loss_at(x0, t, torch.randn_like(x0)).mean()}

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, steps: int | None = None,
               batch_size: int = 256) -> torch.Tensor:
        """Ancestral sampling over all T steps (`steps` None or T), or DDIM (eta 0) over `steps` evenly spaced."""
        if steps is not None and not 1 <= steps <= self.timesteps:
            raise VisrecError(f"--steps {steps} must be between 1 and the model's {self.timesteps} diffusion steps",
                              f"for example --steps 50 (DDIM), or leave it out for all {self.timesteps}")
        out = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            x = torch.randn(m, self.in_chans, *self.image_size, generator=generator).to(self.device)
            if steps is None or steps == self.timesteps:
                x = self._ancestral(x, generator)
            else:
                x = self._ddim(x, steps)
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().cpu())
        return torch.cat(out)

    def _ancestral(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        for t in reversed(range(self.timesteps)):
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            b, a = self.betas[t], self.abar[t]
            eps = self.net(x, tt)
            mean = (x - b / (1 - a).sqrt() * eps) / (1 - b).sqrt()
            if t > 0:
                var = b * (1 - self.abar[t - 1]) / (1 - a)  # the posterior variance
                x = mean + var.sqrt() * torch.randn(x.shape, generator=generator).to(x.device)
            else:
                x = mean
        return x

    def _ddim(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        ts = torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        for i, t in enumerate(ts):
            tt = torch.full((len(x),), t, device=x.device, dtype=torch.long)
            a = self.abar[t]
            eps = self.net(x, tt)
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            a_prev = self.abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=x.device)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x


# ---------------------------------------------------------------------------------------- the registry


def _check(in_chans: int, num_classes: int, name: str) -> None:
    if num_classes != in_chans:
        raise VisrecError(f"{name} generates images of {in_chans} channel(s), not {num_classes} outputs",
                          "train it with --task generate")


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


@register_model(family="generative")
def vae(in_chans: int = 1, num_classes: int = 1, image_size=None, *, latent: int = 16, width: int = 32,
        likelihood: str = "bernoulli") -> nn.Module:
    """Convolutional VAE, Bernoulli (binarized) or discretized-logistic (8-bit) decoder."""
    _check(in_chans, num_classes, "vae")
    return VAE(in_chans, _size(image_size), latent=latent, width=width, likelihood=likelihood)


@register_model(family="generative")
def dcgan(in_chans: int = 1, num_classes: int = 1, image_size=None, *, latent: int = 64,
          width: int = 64) -> nn.Module:
    """DCGAN with the non-saturating loss (batch norm in both networks)."""
    _check(in_chans, num_classes, "dcgan")
    return GAN(in_chans, _size(image_size), loss="non_saturating", latent=latent, width=width)


@register_model(family="generative")
def wgan_gp(in_chans: int = 1, num_classes: int = 1, image_size=None, *, latent: int = 64, width: int = 64,
            n_critic: int = 5, gp: float = 10.0) -> nn.Module:
    """WGAN-GP: Wasserstein critic without batch norm, gradient penalty, n_critic critic steps per generator step."""
    _check(in_chans, num_classes, "wgan_gp")
    return GAN(in_chans, _size(image_size), loss="wasserstein", latent=latent, width=width, n_critic=n_critic,
               gp=gp)


@register_model(family="generative")
def ddpm(in_chans: int = 1, num_classes: int = 1, image_size=None, *, width: int = 32, timesteps: int = 1000,
         schedule: str = "linear") -> nn.Module:
    """DDPM (Ho et al. 2020) with a small U-Net; ancestral or DDIM sampling."""
    _check(in_chans, num_classes, "ddpm")
    return DDPM(in_chans, _size(image_size), width=width, timesteps=timesteps, schedule=schedule)
