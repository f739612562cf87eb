"""Shared building blocks and the common classifier surface every visrec model exposes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VisrecError


class Classifier(nn.Module):
    """The common surface: `forward_features` -> `forward_head`, a replaceable classifier, and the
    feature maps of each stage (`feature_maps`).

    Subclasses implement `forward_features` and name, as dotted paths: the final nn.Linear in
    `head_path` (default "head"), the stages whose outputs `feature_maps` returns in `stage_paths`.
    The default `forward_head` applies `self.pool`, then the head.
    """

    head_path: str = "head"
    stage_paths: tuple[str, ...] = ()
    pool: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.head_path)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final layer with a freshly initialized one of `num_classes` outputs."""
        old = self.get_classifier()
        set_submodule(self, self.head_path, nn.Linear(old.in_features, num_classes, device=old.weight.device))

    @property
    def num_features(self) -> int:
        return self.get_classifier().in_features

    def feature_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The output of every stage (`stage_paths`, input side first) for a batch, by stage path."""
        if not self.stage_paths:
            return {"features": self.forward_features(x)}
        maps: dict[str, torch.Tensor] = {}
        hooks = [self.get_submodule(p).register_forward_hook(lambda m, i, o, p=p: maps.__setitem__(p, o))
                 for p in self.stage_paths]
        try:
            self.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return {p: maps[p] for p in self.stage_paths}


def feature_maps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stage feature maps of any model: visrec's `feature_maps`, timm's `forward_intermediates`, or the output
    of `forward_features` as the one stage of a model that offers neither."""
    if hasattr(model, "feature_maps"):
        return model.feature_maps(x)
    if hasattr(model, "forward_intermediates"):
        maps = model.forward_intermediates(x, intermediates_only=True)
        return {f"stage{i}": m for i, m in enumerate(maps)}
    if hasattr(model, "forward_features"):
        return {"features": model.forward_features(x)}
    raise VisrecError(f"{type(model).__name__} has no forward_features", "build it with visrec.models.create_model")


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class GlobalPool(nn.Module):
    """(N, C, H, W) -> (N, C) by global average or max pooling; with `grid=g`, (N, C * g * g): the average or
    maximum over each cell of a g x g grid (PyTorch's adaptive pooling regions), flattened channel-major, so the
    head still sees where in the image a feature fired.

    The grid is computed with plain pooling or slices, never `adaptive_*_pool2d` at g > 1: those have no ONNX
    export for sizes that do not divide (7x7 maps to 2x2), and the values are the same.
    """

    def __init__(self, kind: str = "avg", grid: int = 1):
        super().__init__()
        if kind not in ("avg", "max"):
            raise VisrecError(f"pool {kind!r} is not valid", "use avg or max")
        if grid < 1:
            raise VisrecError(f"pool grid={grid} must be >= 1 (cells per side; 1 pools the whole map)",
                              "e.g. model.kwargs.pool_grid=2")
        self.kind, self.grid = kind, int(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid == 1:
            # The adaptive pooling kernels are 2-4x faster than x.mean/amax((2, 3)) on channels_last input.
            pool = F.adaptive_avg_pool2d if self.kind == "avg" else F.adaptive_max_pool2d
            return pool(x, 1).flatten(1)
        return grid_pool(x, self.grid, self.kind).flatten(1)

    def extra_repr(self) -> str:
        return self.kind if self.grid == 1 else f"{self.kind}, grid={self.grid}"


def _cells(size: int, grid: int) -> list[tuple[int, int]]:
    """Adaptive pooling's regions along one side: cell i spans [floor(i*size/grid), ceil((i+1)*size/grid))."""
    return [(i * size // grid, -(-(i + 1) * size // grid)) for i in range(grid)]


def grid_pool(x: torch.Tensor, grid: int, kind: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, grid, grid), equal to `adaptive_{kind}_pool2d(x, grid)`: one pooling op when the
    cells are evenly spaced and of one size (7 -> 2: kernel 4, stride 3), else one reduction per cell (maps
    smaller than the grid repeat cells, as adaptive pooling does)."""
    rows, cols = _cells(x.shape[-2], grid), _cells(x.shape[-1], grid)

    def uniform(cells: list[tuple[int, int]]) -> tuple[int, int] | None:
        sizes = {b - a for a, b in cells}
        steps = {cells[i + 1][0] - cells[i][0] for i in range(len(cells) - 1)}
        return (sizes.pop(), steps.pop()) if len(sizes) == 1 and len(steps) == 1 and min(steps) > 0 else None

    r, c = uniform(rows), uniform(cols)
    if r and c:
        pool = F.max_pool2d if kind == "max" else F.avg_pool2d
        return pool(x, (r[0], c[0]), (r[1], c[1]))
    reduce = (lambda t: t.amax((2, 3))) if kind == "max" else (lambda t: t.mean((2, 3)))
    cells = [reduce(x[:, :, a:b, p:q]) for a, b in rows for p, q in cols]
    return torch.stack(cells, -1).unflatten(-1, (grid, grid))


class Maxout(nn.Module):
    """Maxout (Goodfellow et al., 2013) over groups of `pieces` channels: (N, C*pieces, ...) -> (N, C, ...).

    As a drop-in activation (`act="maxout"`) it keeps the channel count: the channels are duplicated with a
    learned per-channel scale and shift of the second piece, so max(x, a*x + b) (a and b start at 0.25, 0).
    """

    def __init__(self, channels: int | None = None, pieces: int = 2):
        super().__init__()
        self.pieces = pieces
        self.scale = nn.Parameter(torch.full((channels,), 0.25)) if channels else None
        self.shift = nn.Parameter(torch.zeros(channels)) if channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:  # drop-in form: max(x, a x + b) per channel
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.maximum(x, x * self.scale.view(shape) + self.shift.view(shape))
        n, c = x.shape[:2]
        return x.view(n, c // self.pieces, self.pieces, *x.shape[2:]).amax(2)


ACTIVATIONS = {
    "relu": lambda c: nn.ReLU(inplace=True),
    "leaky_relu": lambda c: nn.LeakyReLU(0.01, inplace=True),
    "prelu": lambda c: nn.PReLU(c or 1),
    "elu": lambda c: nn.ELU(inplace=True),
    "gelu": lambda c: nn.GELU(),
    "tanh": lambda c: nn.Tanh(),
    "sigmoid": lambda c: nn.Sigmoid(),
    "maxout": lambda c: Maxout(c or 1),
}


def activation(name: str, channels: int | None = None) -> nn.Module:
    """An activation by name; `channels` sizes the learned ones (PReLU and maxout: one parameter per channel)."""
    if name not in ACTIVATIONS:
        raise VisrecError(f"activation {name!r} is not valid", f"use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name](channels)


NORMS = ("batch", "group", "layer", "none")


def norm_layer(name: str, channels: int) -> nn.Module:
    """A 2-D normalization by name: batch, group (32 groups, fewer if the channels do not divide), layer
    (one group: normalizes over C, H and W per example), or none."""
    if name == "batch":
        return nn.BatchNorm2d(channels)
    if name == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if name == "layer":
        return nn.GroupNorm(1, channels)
    if name == "none":
        return nn.Identity()
    raise VisrecError(f"norm {name!r} is not valid", f"use one of {', '.join(NORMS)}")


def swap_layers(model: nn.Module, act: str = "relu", norm: str = "batch") -> nn.Module:
    """Replace every ReLU with `act` and every BatchNorm2d with `norm`, in place (keeps the layout, and the
    names of everything else, so weight files of the defaults still load)."""
    if act == "relu" and norm == "batch":
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ReLU) and act != "relu":
            setattr(model, name, activation(act, _channels_before(model, name)))
        elif isinstance(child, nn.BatchNorm2d) and norm != "batch":
            setattr(model, name, norm_layer(norm, child.num_features))
        else:
            swap_layers(child, act, norm)
    return model


def _channels_before(parent: nn.Module, name: str) -> int | None:
    """The channel count that reaches `parent.name`: from the nearest earlier conv/norm in the same parent."""
    channels = None
    for n, m in parent.named_children():
        if n == name:
            break
        channels = getattr(m, "out_channels", getattr(m, "num_features", channels))
    return channels


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a residual branch for whole examples with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al., 2018): channel weights from globally pooled features."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w), inplace=True)))


def resolve_stem(stem: str, image_size: tuple[int, int], large_from: int = 96) -> str:
    """"auto" -> "imagenet" (strided stem, as published) for inputs of at least `large_from` pixels, else
    "small" (no early downsampling, as the CIFAR variants); "imagenet" and "small" pass through."""
    if stem not in ("auto", "imagenet", "small"):
        raise VisrecError(f"stem {stem!r} is not valid", "use auto, imagenet or small")
    if stem == "auto":
        return "imagenet" if min(image_size) >= large_from else "small"
    return stem


def stage_drop_rates(total: float, blocks: int) -> list[float]:
    """The linear decay rule of stochastic depth: block i of n drops with probability total * i / n."""
    return [total * (i + 1) / blocks for i in range(blocks)]


def set_drop_path(model: nn.Module, total: float) -> None:
    """Give every DropPath of a network its stochastic-depth rate, growing linearly with depth to `total`."""
    if not 0.0 <= total < 1.0:
        raise VisrecError(f"drop_path={total} is not a probability below 1", "use a value in [0, 1), e.g. 0.1")
    drops = [m for m in model.modules() if isinstance(m, DropPath)]
    for m, p in zip(drops, stage_drop_rates(total, len(drops)), strict=True):
        m.p = p


def init_residual(model: nn.Module, drop_path: float) -> None:
    """He initialization (fan-out) of every convolution, and the stochastic-depth rates of the blocks."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    set_drop_path(model, drop_path)


class FractionalMaxPool(nn.Module):
    """Graham's fractional max-pooling (2014): 2x2 max-pools over pseudo-random regions that shrink each side by
    `ratio` (default 1/sqrt(2): half the area every two pools, not every one). In training the regions are drawn
    anew each pass (torch's global generator, saved in checkpoints); in eval mode they are fixed, so evaluation is
    deterministic (torch's own FractionalMaxPool2d draws them in eval mode too)."""

    def __init__(self, ratio: float = 2 ** -0.5):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        size = (max(1, int(h * self.ratio)), max(1, int(w * self.ratio)))
        samples = None if self.training else torch.full((x.shape[0], x.shape[1], 2), 0.5, dtype=x.dtype,
                                                         device=x.device)
        return F.fractional_max_pool2d(x, 2, output_size=size, _random_samples=samples)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:.4g}"


class MaxPool2x2(nn.MaxPool2d):
    """A 2x2, stride-2 max-pool that, where no gradient flows through it, takes the maximum of the four strided
    views instead of calling `max_pool2d`: on the CPU that is 1.2-4x faster for batched channels_last maps (4x for
    the 18-channel 28x28 maps of a whitening stem), and gives the same values. Where a gradient flows, and when
    traced for export or compiled, it is `nn.MaxPool2d(2)` (same module tree and state dict either way)."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ((x.requires_grad and torch.is_grad_enabled()) or x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2
                or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export()):  # (a map under 2x2 gets max_pool2d's own error)
            return super().forward(x)
        h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
        return torch.maximum(torch.maximum(x[:, :, 0:h:2, 0:w:2], x[:, :, 0:h:2, 1:w:2]),
                             torch.maximum(x[:, :, 1:h:2, 0:w:2], x[:, :, 1:h:2, 1:w:2]))


def downsampler(kind: str = "max") -> nn.Module:
    """The 2x downsampling of a stage: `max` (2x2 max-pool) or `fractional` (FractionalMaxPool, ratio 1/sqrt(2))."""
    if kind == "max":
        return MaxPool2x2()
    if kind == "fractional":
        return FractionalMaxPool()
    raise VisrecError(f"downsample {kind!r} is not valid", "use max or fractional (model.kwargs.downsample)")


def conv_bn_act(cin: int, cout: int, *, pool: bool = False, act: str = "relu", kernel: int = 3,
                downsample: str = "max") -> nn.Sequential:
    """conv -> [2x2 max-pool, or fractional] -> batch norm -> activation. Pooling before the norm halves its cost."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)]
    if pool:
        layers.append(downsampler(downsample))
    layers += [nn.BatchNorm2d(cout), activation(act, cout)]
    return nn.Sequential(*layers)


class PatchWhitening(nn.Module):
    """A fixed first layer that whitens the k x k patches of the training images (airbench's first layer).

    Its filters are the eigenvectors of the covariance of the (C*k*k)-dimensional patches of the normalized
    training images, each scaled by 1/sqrt(eigenvalue + eps), so on those images the outputs are decorrelated
    with unit variance: the layers after it see well-conditioned inputs from the first step. It emits each
    whitened direction and its negation so a following ReLU loses neither sign: 2*C*k*k channels, or
    `out_channels` from the directions of largest variance (dropping the faintest, noisiest ones). The filters
    are a buffer (saved with the weights, never trained); the per-channel bias is trained, or with
    `train_bias=False` a zero buffer (same state-dict key), so no gradient reaches this layer. Until `fit` runs,
    the filters pick out the raw pixels of each patch.
    """

    def __init__(self, in_chans: int, kernel_size: int = 2, out_channels: int | None = None, eps: float = 5e-4,
                 train_bias: bool = True):
        super().__init__()
        d = in_chans * kernel_size * kernel_size
        out_channels = 2 * d if out_channels is None else out_channels
        if out_channels % 2 or not 2 <= out_channels <= 2 * d:
            raise VisrecError(f"patch whitening of {in_chans}-channel {kernel_size}x{kernel_size} patches cannot "
                              f"have {out_channels} output channels",
                              f"use an even number from 2 to {2 * d} (2 x channels x kernel^2), or a larger kernel")
        self.in_chans, self.kernel_size, self.eps = in_chans, kernel_size, eps
        eye = torch.eye(d)[: out_channels // 2]
        self.register_buffer("weight", torch.cat([eye, -eye]).reshape(out_channels, in_chans, kernel_size,
                                                                      kernel_size))
        if train_bias:
            self.bias = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_buffer("bias", torch.zeros(out_channels))

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the filters from a sample of normalized images (N, C, H, W), the inputs this layer will see."""
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise VisrecError(f"patch whitening needs (N, {self.in_chans}, H, W) images, got {tuple(images.shape)}")
        k = self.kernel_size
        patches = F.unfold(images.double(), k).transpose(1, 2).reshape(-1, self.in_chans * k * k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / max(len(patches) - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)
        filters = (evecs / (evals.clamp_min(0) + self.eps).sqrt()).T  # row i: eigenvector i / sqrt(eigenvalue i)
        filters = filters.flip(0)[: self.out_channels // 2]  # the largest-variance directions first
        w = torch.cat([filters, -filters]).reshape_as(self.weight)
        self.weight.copy_(w.to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size  # "same" size; an even kernel's extra row and column of padding go right and below
        if k > 1:
            x = F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2))
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_chans}, {self.out_channels}, kernel_size={self.kernel_size}, eps={self.eps}"



class DropConnectLinear(nn.Linear):
    """A linear layer that drops each weight (not each activation) with probability `p` in training, scaling the
    kept ones by 1/(1-p) (Wan et al., 2013, with inverted scaling instead of their moment-matching inference): in
    eval mode it is the plain layer. Its parameters and their names are nn.Linear's, so checkpoints and exports
    do not change."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, p: float = 0.5, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.p = p

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> DropConnectLinear:
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)  # the same Parameter objects, hooks and flags
        new.p = p
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return F.linear(x, self.weight, self.bias)
        keep = torch.rand_like(self.weight) >= self.p
        return F.linear(x, self.weight * keep / (1 - self.p), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropconnect={self.p}"
