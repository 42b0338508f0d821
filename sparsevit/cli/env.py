"""What a report needs to say about the machine: library versions, devices, the device to use.

Shared by ``info``, ``check`` and ``bench`` (and the benchmark suites), so that every
JSON record names the same environment in the same words.
"""

from __future__ import annotations

import importlib
import os
import platform
from typing import Optional

import torch

__all__ = ["DeviceError", "cpu_name", "environment", "resolve_device", "version_of", "versions"]


class DeviceError(ValueError):
    """The requested device is not there (the message is one line saying why)."""


def version_of(module: str) -> Optional[str]:
    """``module.__version__``, or None when it is not importable."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - an optional library that fails to import is just absent
        return None


def versions() -> dict:
    """Python, sparsevit, torch (and the CUDA it was built with), Triton, timm, numpy, plotting."""
    from .. import __version__

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sparsevit": __version__,
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": version_of("triton"),
        "timm": version_of("timm"),
        "numpy": version_of("numpy"),
        "matplotlib": version_of("matplotlib"),
    }


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and torch's intra-op threads."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    """Device name and library versions, the header of every benchmark and check record."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_name()
    v = versions()
    return {
        "device": device.type,
        "device_name": name,
        "torch": v["torch"],
        "triton": v["triton"],
        "cuda": v["cuda_build"],
        "timm": v["timm"],
        "python": v["python"],
        "sparsevit": v["sparsevit"],
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }


def resolve_device(name: Optional[str]) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N``; None: CUDA when visible, else the CPU) as a device.

    Raises :class:`DeviceError` with a one-line reason when the device is not there.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"--device must be cpu or cuda[:N], got {name!r}") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device must be cpu or cuda[:N], got {name!r}")
    if not torch.cuda.is_available():
        why = "torch is a CPU-only build" if torch.version.cuda is None else f"torch (CUDA {torch.version.cuda}) sees no GPU"
        raise DeviceError(f"--device {name}: no CUDA device here ({why}); use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device
