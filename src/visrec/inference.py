"""Inference backends for a trained network, in one registry: torch eager, channels_last, torch.compile, or its ONNX
graph through onnxruntime. A backend declares which outputs it can produce (`tensor`: one tensor per batch;
`structured`: dicts of boxes, or decoding loops in Python) and whether gradients flow through it; a task's predictor
says which it needs, and `visrec.run_store.RunFolder.load_model` refuses a backend that cannot give it.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import VisrecError
from .io import atomic_path, user_cache_dir

META_KEY = "visrec-network"


@dataclass(frozen=True)
class Backend:
    """How a loaded network runs. `build(model, example, path, source)` returns the module to call on normalized
    batches (`example`: one such batch; `path`: where a compiled file of it may be kept; `source`: the checkpoint's
    file, which keys that cache)."""

    name: str
    help: str
    build: Callable[[nn.Module, torch.Tensor, Path, Path], nn.Module]
    outputs: frozenset[str] = frozenset({"tensor", "structured"})  # what a network run this way can return
    gradients: bool = True  # explanations (Grad-CAM) can differentiate through it
    cpu_only: bool = False
    channels_last: bool | None = None  # None: as the run's model.channels_last says


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def check_backend(name: str, outputs: str, what: str) -> Backend | None:
    """The backend `name` (None for auto), refused with the fix when it is unknown or cannot give `outputs`, the
    output `what` (a run, in words) is read from."""
    from .errors import unknown_name

    if name == "auto":
        return None
    if name not in BACKENDS:
        raise unknown_name("inference backend", name, backend_names(), "--backend")
    spec = BACKENDS[name]
    if outputs not in spec.outputs:
        raise VisrecError(f"the {name} backend gives a network's {' or '.join(sorted(spec.outputs))} output, and "
                          f"the predictions of {what} need its {outputs} output (boxes, decoding loops or inputs of "
                          "their own size)", "use --backend torch")
    return spec


def backend_names() -> tuple[str, ...]:
    """The names `--backend` takes: auto, then every registered backend."""
    return ("auto", *BACKENDS)


def _compiled(model: nn.Module, example: torch.Tensor, path: Path, source: Path) -> nn.Module:
    try:
        net = torch.compile(model, dynamic=True)
        with torch.inference_mode():
            net(example)  # compile now, so the first request does not pay for it and a failure names the backend
    except Exception as e:  # noqa: BLE001 - inductor raises many kinds; the user needs the gist
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VisrecError(f"torch.compile could not compile the network: {first[:300]}",
                          "use --backend torch (a CPU needs a C compiler for torch.compile)") from None
    return net


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _onnx(model: nn.Module, example: torch.Tensor, path: Path, source: Path) -> nn.Module:
    return onnx_network(_copy(model).cpu(), example, path, source=source)


register_backend(Backend("torch", "PyTorch eager, as trained", lambda model, *_: model))
register_backend(Backend("channels_last", "PyTorch eager in channels_last memory format (faster convolutions on "
                         "GPUs)", lambda model, *_: _copy(model).to(memory_format=torch.channels_last),
                         channels_last=True))
register_backend(Backend("compile", "torch.compile (inductor); compiled once at load", _compiled,
                         outputs=frozenset({"tensor"}), gradients=False))
register_backend(Backend("onnx", "the network's ONNX graph through onnxruntime (CPU), checked against torch at load",
                         _onnx, outputs=frozenset({"tensor"}), gradients=False, cpu_only=True,
                         channels_last=False))


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
        # idle pool threads sleep instead of spinning: a server's event loop needs those cores between batches
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
