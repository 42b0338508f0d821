"""Where the CUDA binary tools are: ``nvcc`` from the CUDA toolkit; ``ptxas``,
``cuobjdump`` and ``nvdisasm`` from Triton's bundle (the very ``ptxas`` that built the
Triton kernels), else from the toolkit or ``PATH``."""

from __future__ import annotations

import os
import shutil
from typing import Optional

__all__ = ["cuda_home", "find_nvcc", "find_tool"]


def cuda_home() -> Optional[str]:
    """The CUDA toolkit: ``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda``, or the one holding
    the ``nvcc`` on ``PATH``; None if there is none."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def find_nvcc() -> Optional[str]:
    """The path of ``nvcc``, or None."""
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def find_tool(name: str) -> str:
    """The path of ``ptxas``, ``cuobjdump`` or ``nvdisasm``; a clear error when none is found."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.isfile(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    home = cuda_home()
    if home and os.path.isfile(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found: neither Triton's bundled tools, $CUDA_HOME/bin nor PATH have it")
