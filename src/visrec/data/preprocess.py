"""Input normalization, fitted on the training split only and saved with every run.

Modes: `channel` subtracts the per-channel mean and divides by the per-channel std (the default);
`image` subtracts the mean image (AlexNet style) and divides by the overall std; `none` feeds raw
0..255 floats (for experiments, and for the doctor to flag).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import VisrecError

MODES = ("channel", "image", "none")


class Normalizer:
    """uint8 images -> float inputs: `(x - mean) / std` with statistics fitted on training images."""

    def __init__(self, mode: str, mean: torch.Tensor, std: torch.Tensor):
        if mode not in MODES:
            raise VisrecError(f"data.normalize {mode!r} is not valid", f"use one of {', '.join(MODES)}")
        self.mode = mode
        self.mean = mean.float()  # broadcastable to (C, H, W)
        self.std = std.float()
        self._inv_std = 1.0 / self.std

    @classmethod
    def fit(cls, images: torch.Tensor, mode: str = "channel") -> Normalizer:
        """Fit on uint8 (N, C, H, W) training images, accumulating in float64 over chunks."""
        if mode not in MODES:
            raise VisrecError(f"data.normalize {mode!r} is not valid", f"use one of {', '.join(MODES)}")
        c, h, w = images.shape[1:]
        if mode == "none":
            return cls(mode, torch.zeros(c, 1, 1), torch.ones(c, 1, 1))
        n = images.shape[0]
        s = torch.zeros(c, h, w, dtype=torch.float64)
        s2 = torch.zeros(c, h, w, dtype=torch.float64)
        for chunk in images.split(8192):
            f = chunk.to(torch.float64)
            s += f.sum(0)
            s2 += (f * f).sum(0)
        if mode == "channel":
            count = n * h * w
            mean = s.sum((1, 2)) / count
            var = s2.sum((1, 2)) / count - mean**2
            return cls(mode, mean.view(c, 1, 1), var.clamp_min(1e-12).sqrt().clamp_min(1e-3).view(c, 1, 1))
        mean_image = s / n
        var = (s2.sum() / (n * c * h * w)) - (mean_image**2).mean()  # total variance around the mean image
        return cls(mode, mean_image, var.clamp_min(1e-12).sqrt().clamp_min(1e-3).view(1, 1, 1))

    def to(self, device: torch.device | str) -> Normalizer:
        return Normalizer(self.mode, self.mean.to(device), self.std.to(device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, C, H, W), keeping x's memory format."""
        return (x.float() - self.mean) * self._inv_std

    def state(self) -> dict[str, Any]:
        """JSON-ready form, stored in checkpoint state files."""
        return {"mode": self.mode, "shape": list(self.mean.shape), "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Normalizer:
        shape = state["shape"]
        mean = torch.tensor(state["mean"], dtype=torch.float32).view(shape)
        std = torch.tensor(state["std"], dtype=torch.float32)
        return cls(state["mode"], mean, std.view(-1, 1, 1) if std.numel() > 1 else std.view(1, 1, 1))

    def __repr__(self) -> str:
        if self.mode == "channel":
            m = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
            s = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
            return f"Normalizer(channel, mean=[{m}], std=[{s}])"
        return f"Normalizer({self.mode}, mean {tuple(self.mean.shape)}, std={self.std.flatten()[0]:.4g})"
