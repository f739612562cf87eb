"""Attribution methods by name: (model, x, target, **options) -> (N, H, W) maps, larger = more important.

    saliency        |d score / d pixel|, the largest over channels (Simonyan et al. 2014)
    smoothgrad      saliency averaged over noisy copies of the image (Smilkov et al. 2017)
    guided_backprop gradients with negative signals stopped at every ReLU (Springenberg et al. 2015)
    gradcam         ReLU(sum_k w_k A_k) on the last spatial feature map A, w_k = mean gradient (Selvaraju et al.)
    occlusion       the drop of the class probability when a gray patch hides each region (Zeiler and Fergus)

`score` is the class logit. Every method leaves the model's weights, mode and hooks as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VisrecError, unknown_name

MethodFn = Callable[..., torch.Tensor]
METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return deco


def attribute(method: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
    """The (N, H, W) attribution map of `method` for preprocessed images `x` and classes `target`."""
    if method not in METHODS:
        raise unknown_name("explain method", method, METHODS, "--method")
    was_training = model.training
    grads = [p.grad for p in model.parameters()]
    model.eval()
    try:
        return METHODS[method](model, x, target, **options).detach().float()
    finally:
        model.train(was_training)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g


def _input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    logits.gather(1, target[:, None]).sum().backward()
    return x.grad


@register_method("saliency")
def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _input_gradient(model, x, target).abs().amax(1)


@register_method("smoothgrad")
def smoothgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor, samples: int = 25, noise: float = 0.15,
               seed: int = 0) -> torch.Tensor:
    """Mean |gradient| over `samples` copies with Gaussian noise of `noise` times each image's value range."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    total = torch.zeros_like(x)
    for _ in range(samples):
        eps = torch.randn(x.shape, generator=g).to(x.device) * noise * span
        total += _input_gradient(model, x + eps, target).abs()
    return (total / samples).amax(1)


@register_method("guided_backprop")
def guided_backprop(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """On a copy of the model whose ReLU modules pass back only positive gradients (functional ReLUs inside a
    model's own code are not reached)."""
    guided = copy.deepcopy(model).eval()
    relus = [m for m in guided.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise VisrecError(f"{type(model).__name__} has no ReLU modules, so guided backpropagation equals plain "
                          "gradients", "use --method saliency")
    for m in relus:
        m.inplace = False
        m.register_full_backward_hook(lambda mod, grad_in, grad_out: (grad_in[0].clamp(min=0),))
    return _input_gradient(guided, x, target).abs().amax(1)


def spatial_layer(model: nn.Module, layer: str | None = None) -> str | None:
    """The module path whose output Grad-CAM explains: `layer`, else None meaning forward_features' output."""
    if layer is None:
        return None
    try:
        model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][-12:]
        raise VisrecError(f"model {type(model).__name__} has no layer {layer!r}",
                          f"layers near the output: {', '.join(names)}") from None
    return layer


@register_method("gradcam")
def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Grad-CAM on the last spatial feature map (the output of forward_features), or on module `layer`."""
    path = spatial_layer(model, layer)
    store: dict[str, torch.Tensor] = {}
    if path is None:
        if not hasattr(model, "forward_features"):
            raise VisrecError(f"{type(model).__name__} has no forward_features", "give --layer PATH")
        feats = model.forward_features(x)
        if feats.dim() != 4:
            raise VisrecError(f"Grad-CAM needs spatial feature maps, but {type(model).__name__}'s features are "
                              f"{tuple(feats.shape)}", "use saliency, smoothgrad or occlusion for this model, or "
                              "give --layer PATH of a convolutional layer")
        feats.retain_grad()
        logits = model.forward_head(feats)
        store["a"] = feats
    else:
        def keep(module, inputs, output):
            output.retain_grad()
            store["a"] = output

        handle = model.get_submodule(path).register_forward_hook(keep)
        try:
            logits = model(x)
        finally:
            handle.remove()
        if store["a"].dim() != 4:
            raise VisrecError(f"layer {path!r} outputs {tuple(store['a'].shape)}, not a spatial feature map",
                              "give a convolutional layer")
    logits.gather(1, target[:, None]).sum().backward()
    a = store["a"]
    weights = a.grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]


@register_method("occlusion")
@torch.no_grad()
def occlusion(model: nn.Module, x: torch.Tensor, target: torch.Tensor, patch: int | None = None,
              stride: int | None = None, batch: int = 256) -> torch.Tensor:
    """Probability drop of the target class with a zero (the mean, after normalization) patch over each place,
    averaged over the patches covering each pixel."""
    n, _, h, w = x.shape
    p = patch or max(2, min(h, w) // 7)
    s = stride or max(1, p // 2)
    base = model(x).softmax(1).gather(1, target[:, None])[:, 0]
    heat = torch.zeros(n, h, w, device=x.device)
    count = torch.zeros(h, w, device=x.device)
    places = [(i, j) for i in range(0, max(h - p, 0) + 1, s) for j in range(0, max(w - p, 0) + 1, s)]
    for k in range(n):
        for start in range(0, len(places), batch):
            chunk = places[start: start + batch]
            xs = x[k: k + 1].repeat(len(chunk), 1, 1, 1)
            for b, (i, j) in enumerate(chunk):
                xs[b, :, i: i + p, j: j + p] = 0
            drop = base[k] - model(xs).softmax(1)[:, target[k]]
            for b, (i, j) in enumerate(chunk):
                heat[k, i: i + p, j: j + p] += drop[b]
                if k == 0:
                    count[i: i + p, j: j + p] += 1
    return heat / count.clamp_min(1)
