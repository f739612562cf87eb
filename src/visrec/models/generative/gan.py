"""Implicit density: DCGAN (non-saturating loss) and WGAN-GP (Wasserstein loss, gradient penalty, n_critic critic
steps per generator step), trained jointly or alternately."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from .._registry import register_model
from .base import GenerativeModel, _check, _size, _up_to


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
        """`joint`: the critic's and the generator's losses of one simultaneous step (module doc). For alternating
        updates with two optimizers (the caller counting `steps`): `critic` and `critic+samples`, the critic's loss
        on `x` and fresh samples (`critic+samples` also returns the samples as `fake`, still on the generator's graph,
        for the generator step that follows); `generator:samples`, the generator's loss for samples `x` (that `fake`)
        through the critic as it is now, as PyTorch's DCGAN example scores one batch of samples for both steps;
        `generator`, the same for fresh samples as many as `x` (across processes: DDP sees the generator used in the
        forward whose backward reaches it)."""
        if mode in ("critic", "critic+samples"):
            return self._critic_loss(x, keep=mode == "critic+samples")
        if mode == "generator:samples":
            return self._generator_loss(x)
        if mode == "generator":
            return self._generator_loss(self.generator(torch.randn(len(x), self.latent, device=x.device)))
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

    def _critic_loss(self, x: torch.Tensor, keep: bool = False) -> dict[str, torch.Tensor]:
        z = torch.randn(len(x), self.latent, device=x.device)
        if keep:
            kept = self.generator(z)
            fake = kept.detach()
        else:
            with torch.no_grad():
                fake = self.generator(z)
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
        out = {"loss": d_loss, "d_loss": d_loss.detach() * ones, "d_acc": acc.detach() * ones}
        return {**out, "fake": kept} if keep else out

    def _generator_loss(self, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        score = self.critic(fake)
        g_loss = F.softplus(-score).mean() if self.loss_kind == "non_saturating" else -score.mean()
        return {"loss": g_loss, "g_loss": g_loss.detach() * torch.ones(len(fake), device=fake.device)}

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
