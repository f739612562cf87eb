"""What every generative model shares: images as floats 0..255 in, `forward(x)` -> {"loss", stats...},
`sample(n)`, and for likelihood models `bits_per_dim(x)`."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import VisrecError

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


def _up_to(h: int) -> int:
    return (h + 3) // 4


def _check(in_chans: int, num_classes: int, name: str) -> None:
    if num_classes != in_chans:
        raise VisrecError(f"{name} generates images of {in_chans} channel(s), not {num_classes} outputs",
                          "train it with --task generate")
