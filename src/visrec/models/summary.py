"""Per-layer summary of a network: output shape, parameters, multiply-accumulates and activation memory.

What is counted, per example (batch size 1):
- `macs`: the multiply-accumulates of convolutions (including grouped and depthwise ones, and the fixed
  patch-whitening layer) and linear layers, the convention behind the published figures (ResNet-50 at
  224x224: 4.1 G). Element-wise work (normalization, activations, pooling, residual additions) is not counted.
- `activations`: the values each layer writes: its output, plus the input image as the first row, as in
  the course's VGG-16 table. A layer that writes nothing new counts 0: in-place activations, dropout at
  evaluation, identities and flattening views.
- `params`: each layer's own parameters, counted at its first call; the total is every parameter of the
  model once, shared or not.

The pass runs on the model's own device; on the "meta" device (`with torch.device("meta"): model = ...`)
it computes only shapes, so summarizing even the largest network takes milliseconds.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import VisrecError
from .layers import PatchWhitening

_NO_NEW_VALUES = (nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    activations: int
    memory_bytes: int


@dataclass
class Summary:
    input_shape: tuple[int, ...]
    rows: list[LayerRow] = field(default_factory=list)
    params: int = 0
    trainable_params: int = 0

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def activations(self) -> int:
        return sum(r.activations for r in self.rows)

    @property
    def memory_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.rows)

    def to_json(self) -> dict:
        return {"input_shape": list(self.input_shape), "layers": [asdict(r) for r in self.rows],
                "params": self.params, "trainable_params": self.trainable_params, "macs": self.macs,
                "activations": self.activations, "activation_bytes": self.memory_bytes}

    def __str__(self) -> str:
        head = f"{'layer':40s} {'type':18s} {'output':>18s} {'params':>12s} {'MACs':>14s} {'activations':>12s}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            shape = "x".join(map(str, r.output_shape))
            lines.append(f"{r.name[:40]:40s} {r.kind[:18]:18s} {shape:>18s} {r.params:>12,} {r.macs:>14,} "
                         f"{r.activations:>12,}")
        lines.append("-" * len(head))
        lines.append(f"{'total':40s} {'':18s} {'':>18s} {self.params:>12,} {self.macs:>14,} {self.activations:>12,}")
        lines.append(f"params {human(self.params)} · MACs {human(self.macs)} · activations {human(self.activations)} "
                     f"values ({self.memory_bytes / 2**20:.1f} MiB forward, per image)")
        return "\n".join(lines)


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def parse_shape(text: str) -> tuple[int, int, int]:
    """"3x224x224" -> (3, 224, 224)."""
    try:
        c, h, w = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise VisrecError(f"--input {text!r} is not CxHxW", "write it like 3x224x224 or 1x28x28") from None
    if min(c, h, w) < 1:
        raise VisrecError(f"--input {text!r} has a zero or negative size", "use positive sizes, e.g. 3x32x32")
    return c, h, w


def summary(model: nn.Module, input_shape: tuple[int, ...]) -> Summary:
    """Run one example of `input_shape` (C, H, W) through `model` in eval mode and tabulate every leaf layer."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    table = Summary(tuple(input_shape))
    table.rows.append(LayerRow("input", "input", tuple(input_shape), 0, 0, x.numel(), x.numel() * x.element_size()))
    names = {m: n for n, m in model.named_modules()}
    seen: set[nn.Module] = set()

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        out = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(out, torch.Tensor):
            return
        first = module not in seen
        seen.add(module)
        params = sum(p.numel() for p in module.parameters(recurse=False)) if first else 0
        new = not (isinstance(module, _NO_NEW_VALUES) or getattr(module, "inplace", False))
        acts = out.numel() if new else 0
        table.rows.append(LayerRow(names.get(module, "?"), type(module).__name__, tuple(out.shape[1:]), params,
                                   _macs(module, inputs, out), acts, acts * out.element_size()))

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    table.params = sum(p.numel() for p in model.parameters())
    table.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return table


def _macs(module: nn.Module, inputs: tuple, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return out.numel() * per_output
    if isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    if isinstance(module, PatchWhitening):
        return out.numel() * module.weight[0].numel()
    if hasattr(module, "macs_per_example"):  # a network written without layer modules (visrec.ref's twins)
        return inputs[0].shape[0] * module.macs_per_example(tuple(inputs[0].shape[1:]))
    return 0


def model_summary(name: str, input_shape: tuple[int, int, int], num_classes: int = 1000, **options) -> Summary:
    """Summary of a registered model built on the meta device (shapes only: instant, no memory)."""
    from ._registry import _check_input_size, create_model

    c, h, w = input_shape
    with torch.device("meta"):
        model = create_model(name, in_chans=c, num_classes=num_classes, image_size=(h, w), check_size=False,
                             **options)
        try:
            return summary(model, input_shape)
        except (RuntimeError, ValueError, IndexError):
            _check_input_size(name, model, c, (h, w), options)  # says which size the model needs
            raise


def model_table(names: list[str], input_shape: tuple[int, int, int], num_classes: int) -> list[dict]:
    """Name, family, parameters and MACs of registered models at one input: the rows of `visrec models`.

    Summarizing fifty networks takes seconds even on the meta device, so the rows are kept in the user cache,
    keyed by the input, the classes, the versions and the model code itself: later listings are instant."""
    import hashlib
    import json
    from pathlib import Path

    from ..io import user_cache_dir, write_json
    from ..version import __version__
    from ._registry import create_model, model_entry

    code = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        code.update(f.read_bytes())
    key = hashlib.sha256(json.dumps([names, list(input_shape), num_classes, __version__, torch.__version__,
                                     code.hexdigest()]).encode()).hexdigest()[:20]
    cache = user_cache_dir() / "models" / f"{key}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass  # a damaged cache file: compute again
    rows = []
    for name in names:
        e = model_entry(name)
        row = {"name": name, "family": e.family, "params": None, "macs": None, "description": e.description}
        try:
            if e.family in ("detection", "instance"):  # proposals depend on the data: parameters only
                with torch.device("meta"):
                    m = create_model(name, in_chans=input_shape[0], num_classes=num_classes,
                                     image_size=input_shape[1:], check_size=False)
                row.update(params=sum(p.numel() for p in m.parameters()))
            else:
                s = model_summary(name, input_shape, num_classes)
                row.update(params=s.params, macs=s.macs)
        except VisrecError as err:  # too small an input for this one: say so in its row
            row["error"] = err.message
        rows.append(row)
    with contextlib.suppress(OSError):  # a read-only home: the listing still works, only slower next time
        write_json(cache, rows)
    return rows
