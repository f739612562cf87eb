"""convnet: visrec's default, a small batch-norm CNN tuned for time-to-accuracy on the CPU.

At 28x28 it costs about 9.1M multiply-accumulates per image. Layout (widths w0, w1, w2):

    stem    conv3x3(in, w0) - BN - ReLU                      H x W
    stage1  conv3x3(w0, w1) - maxpool2 - BN - ReLU           H/2
    stage2  conv3x3(w1, w2) - maxpool2 - BN - ReLU           H/4
    stage3  conv3x3(w2, w2) - BN - ReLU                      H/4
    head    global max-pool - linear(w2, classes)   (pool_grid=g: the max of each cell of a g x g grid,
                                                      linear(g*g*w2, classes))

Inputs larger than 32 pixels get extra 2x2 max-pools after the stem, so stage1 sees at most 32x32.
`pools` moves the 2x2 max-pools: one flag per conv (stem, stage1, stage2, stage3), default (0, 1, 1, 0) as drawn
above; (1, 1, 0, 0) runs stage1 at H/2 and stages 2-3 at H/4, which cuts the cost to 3.7M (the `fmnist-fast`
preset's layout). `downsample=fractional` makes each flagged pool a fractional max-pool (Graham: sides shrink by
1/sqrt(2), regions drawn at random in training, fixed in eval).

`stem="whiten"` replaces the stem's trained conv with a fixed patch-whitening layer (airbench's first layer,
`layers.PatchWhitening`): its filters whiten the `whiten_kernel` x `whiten_kernel` patches of the training images
(the Trainer fits them on a sample before the first step), then ReLU. It emits w0 channels: the w0/2 whitened
directions of largest variance and their negations, so w0 must be even and at most 2 x channels x kernel^2.
`whiten_eps` (5e-4) is added to each patch eigenvalue before the square root: larger values damp the directions
of small variance rather than amplify them to unit variance (0.1 on `fmnist-fast`, 7 epochs, 8 seeds: 93.22%
against 93.14%, within the noise). Its per-channel bias trains unless `whiten_bias=False`, which holds it at zero:
then nothing before stage1 has a gradient, and the backward pass skips stage1's input gradient and the stem's pool
and ReLU (about 25% more training steps per second for `fmnist-fast`).

Larger versions: a fourth width gives stage3 its own (`widths=[18,64,128,256]`; by default stage3 keeps stage2's),
and `depth=D` makes each stage D convolutions, the first pooling as flagged and the rest conv-BN-ReLU at the same
width (airbench's blocks are depth 2).

`pool_grid=2` pools the last map to the maxima of a 2x2 grid of cells (overlapping at odd sides: 7x7 -> four 4x4
cells) rather than one global maximum, so the head sees whether a feature fired at the top or the bottom, left or
right: a collar against a hem. It costs a 4x larger head and nothing measurable per step; `fmnist-fast` at a fixed
7 epochs, 8 seeds: 93.13% against 93.00% with the global maximum (3x3 cells: 93.05%, 4 seeds).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import VisrecError
from ._registry import register_model
from .layers import Classifier, GlobalPool, MaxPool2x2, PatchWhitening, activation, conv_bn_act, downsampler


class ConvNet(Classifier):
    stage_paths = ("stem", "stages.0", "stages.1", "stages.2")

    def __init__(
        self, in_chans: int, num_classes: int, image_size: tuple[int, int],
        widths: tuple[int, ...], act: str, pool: str, pools: tuple[bool, bool, bool, bool] = (0, 1, 1, 0),
        stem: str = "conv", whiten_kernel: int = 3, downsample: str = "max", whiten_bias: bool = True,
        depth: int = 1, pool_grid: int = 1, whiten_eps: float = 5e-4,
    ):
        super().__init__()
        if len(widths) not in (3, 4) or min(widths) < 1:
            raise VisrecError(f"convnet widths {list(widths)} must be 3 or 4 positive numbers (stem, stage1, stage2"
                              "[, stage3]; stage3 has stage2's width unless given)",
                              "e.g. model.kwargs.widths=[16,32,64]")
        if depth < 1:
            raise VisrecError(f"convnet depth={depth} must be >= 1 (convolutions per stage)",
                              "e.g. model.kwargs.depth=2")
        w0, w1, w2, w3 = (*widths, widths[2]) if len(widths) == 3 else widths
        if len(pools) != 4:
            raise VisrecError(f"convnet pools {list(pools)} must have 4 flags (stem, stage1, stage2, stage3)",
                              "e.g. model.kwargs.pools=[0,1,1,0]")
        if 2 ** sum(map(bool, pools)) > min(image_size):
            raise VisrecError(f"convnet pools {list(pools)} halve {tuple(image_size)} images below one pixel",
                              "use fewer pooling flags")
        if stem not in ("conv", "whiten"):
            raise VisrecError(f"convnet stem {stem!r} is not valid", "use conv or whiten")
        if whiten_kernel < 1:
            raise VisrecError(f"convnet whiten_kernel={whiten_kernel} must be >= 1",
                              "e.g. model.kwargs.whiten_kernel=2")
        extra_pools = max(0, math.ceil(math.log2(min(image_size) / 32)))
        layers: list[nn.Module]
        if stem == "whiten":
            most = 2 * in_chans * whiten_kernel**2
            if w0 % 2 or w0 > most:
                raise VisrecError(f"convnet widths[0]={w0} cannot be the width of a whitening stem of "
                                  f"{whiten_kernel}x{whiten_kernel} patches: it must be even and at most {most}",
                                  "lower model.kwargs.widths[0] or raise model.kwargs.whiten_kernel")
            try:
                eps = float(whiten_eps)
            except (TypeError, ValueError):
                eps = float("nan")
            if not eps > 0:
                raise VisrecError(f"convnet whiten_eps={whiten_eps!r} must be a number > 0 (it is added to each "
                                  "eigenvalue before the square root)", "e.g. model.kwargs.whiten_eps=0.1")
            whiten = PatchWhitening(in_chans, whiten_kernel, w0, train_bias=bool(whiten_bias), eps=eps)
            layers = [whiten, *([downsampler(downsample)] if pools[0] else []), activation(act, w0)]
        else:
            layers = [conv_bn_act(in_chans, w0, act=act, pool=bool(pools[0]), downsample=downsample)]
        layers += [MaxPool2x2() for _ in range(extra_pools)]
        self.stem = nn.Sequential(*layers)

        def stage(cin: int, cout: int, pooled: bool) -> nn.Sequential:
            first = conv_bn_act(cin, cout, pool=pooled, act=act, downsample=downsample)
            if depth == 1:
                return first
            return nn.Sequential(first, *(conv_bn_act(cout, cout, act=act) for _ in range(depth - 1)))

        self.stages = nn.Sequential(stage(w0, w1, bool(pools[1])), stage(w1, w2, bool(pools[2])),
                                    stage(w2, w3, bool(pools[3])))
        self.pool = GlobalPool(pool, pool_grid)
        self.head = nn.Linear(w3 * self.pool.grid**2, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H, W) -> (B, w3, H/2^p, W/2^p), p the pools flagged


@register_model(family="convnet")
def convnet(
    *, in_chans: int, num_classes: int, image_size: tuple[int, int],
    widths: tuple[int, ...] = (16, 32, 64), act: str = "relu", pool: str = "max",
    pools: tuple[bool, bool, bool, bool] = (0, 1, 1, 0), stem: str = "conv", whiten_kernel: int = 3,
    downsample: str = "max", whiten_bias: bool = True, depth: int = 1, pool_grid: int = 1,
    whiten_eps: float = 5e-4,
) -> nn.Module:
    """Small, fast batch-norm CNN (the default): 4 convs, 2 pools, global max-pool, linear head."""
    return ConvNet(in_chans, num_classes, image_size, tuple(widths), act, pool, tuple(pools), stem, whiten_kernel,
                   downsample, whiten_bias, int(depth), int(pool_grid), whiten_eps)
