"""Export a trained run as one self-describing file: safetensors, ONNX or TorchScript.

Every format carries the class names, the preprocessing and the input shape, so the file predicts
correctly on its own:
- safetensors: the weights, and in the header's metadata `visrec` (JSON: model name and options, classes,
  preprocessing, input shape). Rebuild with `visrec.models.create_model` from that JSON.
- onnx / torchscript: the network with the preprocessing built in. Input: float32 (N, C, H, W) pixel
  values 0..255 (the decoded image, as it comes); output: (N, classes) logits. ONNX keeps the metadata in
  the model's metadata_props (`visrec`), TorchScript in the extra file `visrec.json`; the batch size is free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Normalizer
from .errors import unknown_name
from .inference import export_onnx
from .io import atomic_path

FORMATS = ("safetensors", "onnx", "torchscript")
SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".pt"}


class WithPreprocessing(nn.Module):
    """pixels 0..255 -> the run's normalization (mean/std, or its whitening basis) -> the network's logits."""

    def __init__(self, model: nn.Module, normalizer: Normalizer):
        super().__init__()
        self.model = model
        self.preprocess = normalizer.to("cpu").module()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(pixels))


def export_run(run_path: str | Path, fmt: str = "onnx", out: str | Path | None = None, which: str = "auto") -> Path:
    """Write the run's model in `fmt` (safetensors, onnx, torchscript); returns the file's path."""
    from .runs import Run

    if fmt not in FORMATS:
        raise unknown_name("export format", fmt, FORMATS, "--format")
    run = Run(run_path)
    lm = run.load_model(which, "cpu")
    out = Path(out) if out else run.path / "export" / f"model{SUFFIX[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_meta = json.loads(Path(lm.checkpoint).read_text())
    meta: dict[str, Any] = {"format": "visrec-export-1", "model": ckpt_meta["model"], "classes": lm.classes,
                            "preprocess": lm.normalizer.state(), "input": [lm.in_chans, *lm.image_size],
                            "input_range": "float32 pixel values 0..255, (N, C, H, W)", "checkpoint": lm.checkpoint,
                            **({"transform": lm.fit.state() | {"how": lm.fit.describe()}} if lm.fit else {})}
    model = lm.model.float().to(memory_format=torch.contiguous_format).eval()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if lm.normalizer.whitening:  # the basis travels with the weights: the network is useless without it
            meta["preprocess_tensors"] = "preprocess.*: network input = pixels.flatten(1) @ weight.T + bias"
            tensors.update({f"preprocess.{k}": v for k, v in lm.normalizer.module().state_dict().items()})
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata={"visrec": json.dumps(meta)})
        return out
    wrapped = WithPreprocessing(model, lm.normalizer).eval()
    example = torch.full((2, lm.in_chans, *lm.image_size), 128.0)
    if fmt == "torchscript":
        with torch.no_grad():
            scripted = torch.jit.trace(wrapped, example)
        with atomic_path(out) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={"visrec.json": json.dumps(meta)})
        return out
    return export_onnx(wrapped, example, out, "pixels", "logits", {"visrec": json.dumps(meta)})


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The `visrec` metadata of an exported file, whatever its format."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["visrec"])
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props["visrec"])
    extra = {"visrec.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["visrec.json"])
