"""Input normalization, fitted on the training split only and saved with every run.

Modes: `channel` subtracts the per-channel mean and divides by the per-channel std (the default);
`image` subtracts the mean image (AlexNet style) and divides by the overall std; `none` feeds raw
0..255 floats (for experiments, and for the doctor to flag).

The whitening modes work on whole images as vectors of D = C*H*W values scaled to 0..1, centred on the
mean image, with the covariance's eigenvectors U and eigenvalues L (one eigendecomposition of the D x D
covariance, accumulated over the training split):
`pca` keeps the top k components, `U_k^T x`, as k features (shape (k, 1, 1), for linear and MLP models);
`pca_whiten` also divides each by `sqrt(L + eps)`, so every feature has unit variance; `zca` whitens and
rotates back, `U diag(1/sqrt(L + eps)) U^T x`, which keeps the image layout for any model. `eps`
damps the directions with little variance, which whitening would otherwise blow up with the noise they hold.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from ..errors import VisrecError

MODES = ("channel", "image", "none", "pca", "pca_whiten", "zca")
WHITENING = ("pca", "pca_whiten", "zca")
DEFAULT_VARIANCE = 0.95  # pca, pca_whiten without pca_k: the fewest components that keep this share of variance
RANK_EPS = 0.1  # zca with fewer images than dimensions: the smallest eps that keeps unseen directions tame


def _valid_mode(mode: str) -> None:
    if mode not in MODES:
        raise VisrecError(f"data.normalize {mode!r} is not valid", f"use one of {', '.join(MODES)}")


FIT_CHUNK_VALUES = 1 << 21  # values per chunk when fitting statistics: 16 MB in float64


class Normalizer:
    """uint8 images -> float inputs: `(x - mean) / std`, or a whitening transform (see the module's text), with
    statistics fitted on training images."""

    def __init__(self, mode: str, mean: torch.Tensor, std: torch.Tensor, *,
                 whitening: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None):
        _valid_mode(mode)
        self.mode = mode
        self.mean = mean.float()  # broadcastable to (C, H, W), 0..255 units
        self.std = std.float()
        self._inv_std = 1.0 / self.std
        self.whitening = whitening  # JSON facts of a whitening mode (shape, output, k, eps, explained, digest)
        self.tensors = tensors or {}  # mean (D,), basis (k, D), eigenvalues, components: saved beside the checkpoint
        if mode in WHITENING:
            basis = self.tensors["basis"].float()
            self._wt = (basis.t() / 255.0).contiguous()  # (D, k): acts on raw 0..255 values
            self._bias = -(self.tensors["mean"].float() @ basis.t())  # the mean's image under the basis

    @classmethod
    def fit(cls, images: torch.Tensor, mode: str = "channel", *, k: int | None = None,
            eps: float = 0.01) -> Normalizer:
        """Fit on uint8 (N, C, H, W) training images, accumulating in float64 over chunks. `k` and `eps` are for the
        whitening modes (data.pca_k, data.pca_eps)."""
        _valid_mode(mode)
        c, h, w = images.shape[1:]
        if mode == "none":
            return cls(mode, torch.zeros(c, 1, 1), torch.ones(c, 1, 1))
        if mode in WHITENING:
            return cls._fit_whitening(images, mode, k, eps)
        n = images.shape[0]
        s = torch.zeros(c, h, w, dtype=torch.float64)
        s2 = torch.zeros(c, h, w, dtype=torch.float64)
        # chunks of at most 16 MB in float64, squared in place: a fixed count of 8,192 images was 10 GB per chunk
        # (twice over) at 3x224x224, most of the peak memory of loading a folder of photos
        for chunk in images.split(max(1, FIT_CHUNK_VALUES // (c * h * w))):
            f = chunk.to(torch.float64)
            s += f.sum(0)
            s2 += f.square_().sum(0)
            del f  # before the next chunk is converted: one chunk in float64 at a time, never two
        if mode == "channel":
            count = n * h * w
            mean = s.sum((1, 2)) / count
            var = s2.sum((1, 2)) / count - mean**2
            return cls(mode, mean.view(c, 1, 1), var.clamp_min(1e-12).sqrt().clamp_min(1e-3).view(c, 1, 1))
        mean_image = s / n
        var = (s2.sum() / (n * c * h * w)) - (mean_image**2).mean()  # total variance around the mean image
        return cls(mode, mean_image, var.clamp_min(1e-12).sqrt().clamp_min(1e-3).view(1, 1, 1))

    @classmethod
    def _fit_whitening(cls, images: torch.Tensor, mode: str, k: int | None, eps: float) -> Normalizer:
        n, c, h, w = images.shape
        d = c * h * w
        dims = f"{d} values per image (C x H x W = {c} x {h} x {w})"
        if k is not None and k > d:
            raise VisrecError(f"data.pca_k={k} is larger than the input dimension: {dims}",
                              f"use data.pca_k between 1 and {d}")
        if mode == "zca" and n <= d and (k is None or k >= n) and eps < RANK_EPS:
            raise VisrecError(
                f"data.normalize=zca cannot estimate the covariance of {dims} from {n} training images: it needs more "
                f"images than dimensions, and the directions the images do not span would be amplified by "
                f"1/sqrt(data.pca_eps={eps:g})",
                f"keep fewer components (data.pca_k below {n}), raise data.pca_eps to {RANK_EPS:g} or more, use more "
                "images, or use data.normalize=channel")
        if n < 2:
            raise VisrecError(f"data.normalize={mode} needs at least 2 training images to fit, got {n}")
        flat = images.reshape(n, d)
        total = torch.zeros(d, dtype=torch.float64)
        for chunk in flat.split(max(1, FIT_CHUNK_VALUES // d)):
            total += chunk.to(torch.float64).sum(0)
        mean = total / n / 255.0
        mean32 = mean.float()
        cov = torch.zeros(d, d, dtype=torch.float64)
        for chunk in flat.split(4096):  # float32 products (fast), summed in float64
            f = chunk.float().mul_(1 / 255.0).sub_(mean32)
            cov += (f.t() @ f).double()
        cov /= n - 1
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        share = evals.cumsum(0) / evals.sum().clamp_min(1e-30)
        if k is None:
            k = d if mode == "zca" else int(torch.searchsorted(share, torch.tensor(DEFAULT_VARIANCE,
                                                                                    dtype=share.dtype))) + 1
            k = min(k, d)
        lam, u = evals[:k], evecs[:, :k]
        if mode != "pca" and eps == 0 and float(lam.min()) < 1e-10:
            first = int((lam < 1e-10).nonzero()[0])
            raise VisrecError(f"data.normalize={mode} with data.pca_eps=0: component {first + 1} of {k} has no "
                              "variance in the training images, and whitening would divide by zero",
                              f"raise data.pca_eps (e.g. 0.01) or keep fewer components (data.pca_k={first})")
        if mode == "pca":
            basis = u.t()
        else:
            scaled = u / (lam + eps).sqrt()
            basis = scaled.t() if mode == "pca_whiten" else scaled @ u.t()
        basis = basis.float().contiguous()
        output = [c, h, w] if mode == "zca" else [k, 1, 1]
        facts = {"shape": [c, h, w], "output": output, "k": k, "eps": eps,
                 "explained": float(share[k - 1]), "digest": hashlib.sha256(basis.numpy().tobytes()).hexdigest()[:16]}
        tensors = {"mean": mean32, "basis": basis, "eigenvalues": evals.float(),
                   "components": u[:, : min(k, 64)].t().float().contiguous()}
        return cls(mode, (mean32 * 255.0).view(c, h, w), torch.full((1, 1, 1), 255.0), whitening=facts,
                   tensors=tensors)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def output_shape(self, shape: tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
        """The (C, H, W) the network sees for uint8 images of `shape`."""
        if self.whitening:
            return tuple(self.whitening["output"])  # type: ignore[return-value]
        return tuple(shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> Normalizer:
        return Normalizer(self.mode, self.mean.to(device), self.std.to(device), whitening=self.whitening,
                          tensors={k: v.to(device) for k, v in self.tensors.items()})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, C, H, W) keeping x's memory format; whitening modes give
        (N, *output_shape)."""
        if self.whitening:
            n = x.shape[0]
            if tuple(x.shape[1:]) != tuple(self.whitening["shape"]):
                raise VisrecError(f"data.normalize={self.mode} was fitted on images of shape "
                                  f"{tuple(self.whitening['shape'])} (C, H, W), got {tuple(x.shape[1:])}",
                                  "resize the images as training did")
            y = torch.addmm(self._bias, x.reshape(n, -1).float(), self._wt)
            return y.view(n, *self.whitening["output"])
        return (x.float() - self.mean) * self._inv_std

    def module(self) -> torch.nn.Module:
        """The same transform as a module with buffers (for export: pixels 0..255 in, network inputs out)."""
        return _Preprocess(self)

    def state(self) -> dict[str, Any]:
        """JSON-ready form, stored in checkpoint state files; whitening modes also need `tensors`."""
        if self.whitening:
            return {"mode": self.mode, **self.whitening}
        return {"mode": self.mode, "shape": list(self.mean.shape), "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Normalizer:
        """The normalizer saved as `state()` (JSON) and, for the whitening modes, `tensors` (saved beside it)."""
        if state["mode"] in WHITENING:
            if not tensors or "basis" not in tensors or "mean" not in tensors:
                raise VisrecError(f"the saved preprocessing (data.normalize={state['mode']}) lacks its basis tensors",
                                  "the checkpoint is incomplete: use another checkpoint or retrain")
            facts = {k: v for k, v in state.items() if k != "mode"}
            c, h, w = facts["shape"]
            return cls(state["mode"], (tensors["mean"].float() * 255.0).view(c, h, w), torch.full((1, 1, 1), 255.0),
                       whitening=facts, tensors=dict(tensors))
        shape = state["shape"]
        mean = torch.tensor(state["mean"], dtype=torch.float32).view(shape)
        std = torch.tensor(state["std"], dtype=torch.float32)
        return cls(state["mode"], mean, std.view(-1, 1, 1) if std.numel() > 1 else std.view(1, 1, 1))

    def same_as(self, other: Normalizer) -> bool:
        """Whether both prepare images identically (within float tolerance)."""
        if self.mode != other.mode:
            return False
        if self.whitening or other.whitening:
            return (self.whitening or {}).get("digest") == (other.whitening or {}).get("digest")
        return (self.mean.shape == other.mean.shape
                and torch.allclose(self.mean.cpu(), other.mean.cpu(), atol=1e-4)
                and torch.allclose(self.std.cpu(), other.std.cpu(), atol=1e-4))

    def __repr__(self) -> str:
        if self.mode == "channel":
            m = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
            s = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
            return f"Normalizer(channel, mean=[{m}], std=[{s}])"
        if self.whitening:
            f = self.whitening
            return (f"Normalizer({self.mode}, k={f['k']} of {math.prod(f['shape'])} components keeping "
                    f"{100 * f['explained']:.1f}% of the variance, eps={f['eps']:g})")
        return f"Normalizer({self.mode}, mean {tuple(self.mean.shape)}, std={self.std.flatten()[0]:.4g})"


class _Preprocess(torch.nn.Module):
    def __init__(self, norm: Normalizer):
        super().__init__()
        self.output = tuple(norm.whitening["output"]) if norm.whitening else None
        if norm.whitening:
            self.register_buffer("weight", norm._wt.t().contiguous().cpu())  # (k, D)
            self.register_buffer("bias", norm._bias.cpu())
        else:
            self.register_buffer("mean", norm.mean.cpu().clone())
            self.register_buffer("inv_std", norm._inv_std.cpu().clone())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            return (pixels - self.mean) * self.inv_std
        y = torch.nn.functional.linear(pixels.flatten(1), self.weight, self.bias)
        return y.view(pixels.shape[0], *self.output)
