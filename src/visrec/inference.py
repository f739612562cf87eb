"""Inference backends for a trained network: torch eager, or its ONNX graph through onnxruntime.

On this project's CPUs onnxruntime runs the default network 3x faster than torch eager at batch 256 and 5x at
batch 1, with the same predictions (bench/inference.txt), so `visrec predict` and `visrec eval` use it on CPU by
default (`backend="auto"`). The graph is the network alone (its input is the normalized batch, exactly what torch
gets), so every test-time augmentation and preprocessing step stays in torch, unchanged. It is exported once per
checkpoint and kept next to it (RUN/export/network-<checkpoint>.onnx, or the user cache when the run folder is
read-only); each load checks it against torch eager on probe inputs, and `auto` falls back to torch, saying why,
when onnxruntime is missing, the network does not export, or the two disagree.

    net = onnx_network(model, example, cache_path, source=checkpoint_file)   # an nn.Module, CPU only
    logits = net(normalized_batch)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import VisrecError
from .io import atomic_path, user_cache_dir

BACKENDS = ("auto", "torch", "onnx")
META_KEY = "visrec-network"


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                metadata: dict[str, str]) -> Path:
    """`module` as an ONNX file at `path` (atomically), batch size free, with `metadata` in its metadata_props."""
    try:
        import onnx
    except ImportError:
        raise VisrecError("ONNX export needs the onnx and onnxscript packages",
                          "pip install onnx onnxscript (and onnxruntime to run the file)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(tmp), input_names=[input_name], output_names=[output_name],
                          dynamic_shapes={input_name: {0: torch.export.Dim("batch", min=1)}}, dynamo=True,
                          external_data=False, verbose=False)
        proto = onnx.load(str(tmp))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp))
    return path


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


class OnnxNetwork(nn.Module):
    """An onnxruntime session that stands in for the network: float32 (N, C, H, W) in, (N, K) logits out, on CPU.

    It has one empty parameter so code that asks a model for its device finds the CPU; train/eval modes are
    no-ops (the graph was exported in eval mode)."""

    backend = "onnx"

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {self.input_name: a})[0])


def _probe(example: torch.Tensor) -> torch.Tensor:
    """Inputs to compare backends on: the example, seeded noise at the example's scale, and a constant."""
    g = torch.Generator().manual_seed(0)
    shape = (6, *example.shape[1:])
    scale = example.float().std().clamp_min(1.0)
    noise = torch.randn(shape, generator=g) * scale
    return torch.cat([example.float(), noise, torch.zeros(1, *example.shape[1:])])


def agree(reference: torch.Tensor, candidate: torch.Tensor) -> str | None:
    """None when two backends' logits agree (same argmax, values within 1e-3 of the logits' scale), else why not."""
    if reference.shape != candidate.shape:
        return f"output shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}"
    diff = (reference - candidate).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    if not diff <= 1e-3 * scale:
        return f"logits differ by up to {diff:.3g} (scale {scale:.3g})"
    if not torch.equal(reference.argmax(1), candidate.argmax(1)):
        return "the predicted classes differ"
    return None


def cache_path(preferred: Path, source: Path) -> Path:
    """`preferred` when its folder can be written, else a file in the user cache named by the source's path."""
    folder = preferred.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return preferred
    except OSError:
        pass
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]
    return user_cache_dir() / "onnx" / f"{digest}-{preferred.name}"


def onnx_network(model: nn.Module, example: torch.Tensor, path: Path, *, source: Path,
                 threads: int | None = None) -> OnnxNetwork:
    """`model` (eval mode, CPU) as an OnnxNetwork, exported to `path` unless a file made from the same `source`
    (the checkpoint's file, by path and content) is already there, and checked against `model` on
    probe inputs. Raises VisrecError naming what failed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise VisrecError("the onnx backend needs onnxruntime", "pip install onnxruntime, or use --backend torch"
                          ) from None
    stamp = json.dumps({"source": str(source.resolve()), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                        "input": list(example.shape[1:]), "torch": torch.__version__})
    path = cache_path(path, source)
    fresh = False
    try:
        fresh = path.is_file() and onnx_metadata(path).get(META_KEY) == stamp
    except Exception:  # noqa: BLE001 - an unreadable old file is simply written again
        fresh = False
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    if not fresh:
        try:
            export_onnx(model, example.float(), path, "x", "logits", {META_KEY: stamp})
        except VisrecError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; the user needs the gist
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VisrecError(f"the network does not export to ONNX: {first[:300]}",
                              "use --backend torch") from None
    net = OnnxNetwork(path, threads)
    probe = _probe(example)
    with torch.inference_mode():
        why = agree(model(probe).float(), net(probe))
    if why:
        raise VisrecError(f"the ONNX graph of this network disagrees with torch ({why}); {path}",
                          "use --backend torch")
    return net
