"""Approximate density: the VAE (Kingma and Welling 2014), a Gaussian encoder, reparameterization, a Bernoulli
decoder on binarized images or a discretized logistic one on 8-bit images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ...errors import VisrecError
from .._registry import register_model
from .base import LN2, GenerativeModel, _check, _size, _up_to


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


@register_model(family="generative")
def vae(in_chans: int = 1, num_classes: int = 1, image_size=None, *, latent: int = 16, width: int = 32,
        likelihood: str = "bernoulli") -> nn.Module:
    """Convolutional VAE, Bernoulli (binarized) or discretized-logistic (8-bit) decoder."""
    _check(in_chans, num_classes, "vae")
    return VAE(in_chans, _size(image_size), latent=latent, width=width, likelihood=likelihood)
