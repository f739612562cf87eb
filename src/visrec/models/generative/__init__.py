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

from .autoregressive import (
                             AutoregressiveModel,
                             GatedLayer,
                             GatedPixelCNN,
                             MaskedConv2d,
                             PixelCNN,
                             RowLSTM,
                             autoregressive_mask,
                             channel_groups,
                             gated_pixelcnn,
                             pixelcnn,
                             row_lstm,
)
from .base import LN2, GenerativeModel
from .diffusion import DDPM, SmallUNet, ddpm, noise_schedule
from .gan import GAN, Critic, Generator, dcgan, wgan_gp
from .vae import VAE, vae

__all__ = ["DDPM", "GAN", "LN2", "VAE", "AutoregressiveModel", "Critic", "GatedLayer", "GatedPixelCNN", "Generator",
           "GenerativeModel", "MaskedConv2d", "PixelCNN", "RowLSTM", "SmallUNet", "autoregressive_mask",
           "channel_groups", "dcgan", "ddpm", "gated_pixelcnn", "noise_schedule", "pixelcnn", "row_lstm", "vae",
           "wgan_gp"]
