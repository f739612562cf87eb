"""Diffusion: DDPM (Ho et al. 2020), a small U-Net predicts the noise; ancestral sampling over all T steps or DDIM
(Song et al. 2021) in fewer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from ...errors import VisrecError
from .._registry import register_model
from .base import GenerativeModel, _check, _size, _to_unit


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


@register_model(family="generative")
def ddpm(in_chans: int = 1, num_classes: int = 1, image_size=None, *, width: int = 32, timesteps: int = 1000,
         schedule: str = "linear") -> nn.Module:
    """DDPM (Ho et al. 2020) with a small U-Net; ancestral or DDIM sampling."""
    _check(in_chans, num_classes, "ddpm")
    return DDPM(in_chans, _size(image_size), width=width, timesteps=timesteps, schedule=schedule)
