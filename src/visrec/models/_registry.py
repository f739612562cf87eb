"""The model registry: `@register_model` and `create_model(name, in_chans, num_classes, image_size)`.

`create_model` also accepts `path/to/file.py:function`, a user's function returning any nn.Module;
it is called with whichever of `in_chans`, `num_classes` and `image_size` it accepts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VisrecError, unknown_name
from ..io import import_from_file


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    fn: Callable[..., nn.Module]
    description: str

    def options(self) -> dict[str, Any]:
        """The model's own keyword arguments and their defaults (beyond the three common ones)."""
        sig = inspect.signature(self.fn)
        skip = {"in_chans", "num_classes", "image_size"}
        return {k: p.default for k, p in sig.parameters.items() if k not in skip and p.kind == p.KEYWORD_ONLY}


_MODELS: dict[str, ModelEntry] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, family: str | None = None, name: str | None = None):
    """Register a model builder `fn(in_chans, num_classes, image_size, *, options...)` under its name."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        fam = family or f.__module__.rsplit(".", 1)[-1]
        doc = (inspect.getdoc(f) or "").split("\n")[0]
        _MODELS[key] = ModelEntry(key, fam, f, doc)
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(family: str | None = None) -> list[str]:
    return sorted(n for n, e in _MODELS.items() if family is None or e.family == family)


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        if name.endswith(".py") or "/" in name or "\\" in name:
            path = Path(name.rsplit(":", 1)[0]).expanduser()
            if not path.is_file():
                raise VisrecError(f"--model {name}: there is no file {path}",
                                  "give path/to/file.py:function, the function that builds the network")
            raise VisrecError(f"--model {name}: name the function in {path} that builds the network",
                              f"for example --model {path}:build")
        family = sorted(n for n, e in _MODELS.items() if e.family == name or n.startswith(name))
        if family and name not in family:
            raise VisrecError(f"unknown model {name!r} (from --model): {name} is a family",
                              f"its models: {', '.join(family)}")
        raise unknown_name("model", name, _MODELS, "--model")
    return _MODELS[name]


def _size2(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def create_model(
    name: str,
    in_chans: int = 3,
    num_classes: int = 10,
    image_size: int | tuple[int, int] = 32,
    pretrained: bool = False,
    check_size: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model (or a user file's model) for the data's channels, classes and size.

    The input size is checked first with a forward pass on the meta device (`check_size=False` skips it, for
    callers that run such a pass themselves and report its errors).

    >>> m = create_model("convnet", in_chans=1, num_classes=10, image_size=28)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    size = _size2(image_size)
    if "dropconnect" in kwargs:  # an option of every model: its linear layers drop weights in training
        kwargs = dict(kwargs)
        p = kwargs.pop("dropconnect")
        return with_dropconnect(create_model(name, in_chans, num_classes, image_size, pretrained, check_size,
                                             **kwargs), p)
    if name.startswith("timm:"):
        return _timm_model(name[5:], in_chans, num_classes, size, kwargs, pretrained)
    if pretrained:
        raise VisrecError(f"model.pretrained=true: {name!r} has no published pretrained weights",
                          "start from a trained run with model.weights=RUN, or use timm:NAME with model.pretrained")
    if is_file_model(name):
        return _model_from_file(name, in_chans, num_classes, size, kwargs)
    entry = model_entry(name)
    valid = entry.options()
    bad = [k for k in kwargs if k not in valid]
    if bad:
        listed = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise VisrecError(f"model {name!r} has no option {', '.join(map(repr, bad))}", f"its options: {listed}")
    build = functools.partial(entry.fn, in_chans=in_chans, num_classes=num_classes, image_size=size, **kwargs)
    # Shapes first, on the meta device (instant): an input too small for the network gets a clear error.
    if torch.empty(0).device.type == "meta":
        model = build()
        if check_size:
            _check_input_size(name, model, in_chans, size, kwargs)
        return model
    with torch.device("meta"):
        _check_input_size(name, build(), in_chans, size, kwargs)
    return build()


def _runs_at(model: nn.Module, in_chans: int, size: tuple[int, int]) -> bool:
    try:
        with torch.no_grad():
            model(torch.empty(1, in_chans, *size, device="meta"))
        return True
    except (RuntimeError, ValueError, IndexError):
        return False


def _check_input_size(name: str, model: nn.Module, in_chans: int, size: tuple[int, int], kwargs: dict) -> None:
    """Raise a VisrecError naming the smallest input the (meta-device) model accepts when `size` is too small."""
    if getattr(model, "detector", False):
        return  # torchvision's detectors resize their inputs themselves
    model.eval()
    if _runs_at(model, in_chans, size):
        return
    scale = 1
    while scale < 64 and not _runs_at(model, in_chans, (size[0] * scale * 2, size[1] * scale * 2)):
        scale *= 2
    if scale >= 64:
        return  # not a question of size: let the real forward pass report the actual error
    lo, hi = max(size), max(size) * scale * 2  # square search between a failing and a working side
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs_at(model, in_chans, (mid, mid)) else (mid, hi)
    fix = (" (or stem='small' / 'auto', made for small inputs)" if kwargs.get("stem") not in (None, "auto", "small")
           else "")
    raise VisrecError(f"model {name} does not fit {size[0]}x{size[1]} inputs: it needs at least {hi}x{hi}",
                      f"use images of at least {hi}x{hi} (image folders: --set data.image_size={hi}){fix}")


def _timm_model(name: str, in_chans: int, num_classes: int, size: tuple[int, int], kwargs: dict,
                pretrained: bool = False) -> nn.Module:
    """Any timm model, when timm is installed: it has the same surface (forward_features, forward_head,
    reset_classifier; stage feature maps through `visrec.models.feature_maps`). With `pretrained`, timm's
    published weights (fetched once into its cache); the head is new when the classes differ, and the first
    convolution is adapted to the channels."""
    try:
        import timm
    except ImportError:
        raise VisrecError(f"timm:{name} needs the timm package, which is not installed",
                          "pip install timm (or use a built-in model: visrec models)") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:10]
        raise VisrecError(f"timm has no model {name!r}", f"similar names: {', '.join(close)}" if close else
                          "list them with python -c 'import timm; print(timm.list_models())'")
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        raise VisrecError(f"timm:{name}: its pretrained weights could not be loaded ({type(e).__name__}: {e})",
                          "they are downloaded once and cached: connect once, or copy them into the Hugging Face "
                          "cache; or set model.pretrained=false") from None
    check_output(model, f"timm:{name}", in_chans, num_classes, size)
    return model


def is_file_model(name: str) -> bool:
    return ":" in name and name.split(":", 1)[0].endswith(".py")


def _model_from_file(spec: str, in_chans: int, num_classes: int, size: tuple[int, int], kwargs: dict) -> nn.Module:
    fn = import_from_file(spec, "model", "--model path/to/file.py:function")
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    offered = {"in_chans": in_chans, "num_classes": num_classes, "image_size": size, **kwargs}
    args = {k: v for k, v in offered.items() if takes_all or k in params}
    try:
        model = fn(**args)
    except Exception as e:  # noqa: BLE001
        raise VisrecError(f"{spec} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise VisrecError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module", "return the network")
    check_output(model, spec, in_chans, num_classes, size)
    return model


class BadModelOutput(VisrecError):
    """A model's output is not (batch, num_classes) scores."""


def check_output(model: nn.Module, name: str, in_chans: int, num_classes: int, size: tuple[int, int]) -> None:
    """One forward pass on zeros: the output must be (batch, num_classes) logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_chans, *size))
    except Exception as e:  # noqa: BLE001
        raise VisrecError(
            f"model {name} failed on a batch of shape (2, {in_chans}, {size[0]}, {size[1]}): {type(e).__name__}: {e}",
            "check that it accepts the dataset's channels and image size",
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadModelOutput(
            f"model {name} returned {shape} for a batch of 2; it must return (batch, {num_classes}) logits, "
            f"one per class",
            "end the network with a layer of num_classes outputs, with no softmax",
        )


def with_dropconnect(model: nn.Module, p: Any) -> nn.Module:
    """Every nn.Linear of `model` becomes a DropConnectLinear (same parameters and names) dropping weights with
    probability `p` in training (`model.kwargs.dropconnect`)."""
    from .layers import DropConnectLinear

    try:
        p = float(p)
    except (TypeError, ValueError):
        p = float("nan")
    if not 0 <= p < 1:
        raise VisrecError(f"model.kwargs.dropconnect={p!r} is not a probability in [0, 1)",
                          "e.g. --set model.kwargs.dropconnect=0.5 (the probability of dropping each weight)")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise VisrecError(f"model.kwargs.dropconnect: {type(model).__name__} has no linear layer to apply it to",
                          "use a model with fully connected layers (mlp, convnet's head, alexnet, vgg)")
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, DropConnectLinear.from_linear(m, p))
    return model
