"""Helpers shared by the tests: backends to run, devices, tolerances."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from sparsevit.backend import OpSupport

CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params(support: "OpSupport | None" = None) -> list:
    """Every backend as a pytest param; ``cuda`` carries the gpu marker.

    With an op's ``support`` (e.g. ``BLOCK_SPARSE_SUPPORT``), the C++ CPU backend ``cpp``
    is included when that op has it.
    """
    params = [
        pytest.param("torch", id="torch"),
        pytest.param("triton", id="triton"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]
    if support is not None and "cpp" in support.backends:
        params.insert(1, pytest.param("cpp", id="cpp"))
    return params


def device_for(backend: str) -> torch.device:
    """Where a backend's tests run: the CPU for ``cpp``; CUDA when present (always for
    ``cuda``), else the CPU, for the others."""
    if backend == "cpp":
        return torch.device("cpu")
    return torch.device("cuda" if CUDA or backend == "cuda" else "cpu")


def require_backend(backend: str) -> None:
    """Fail (not skip) when a backend that should run here cannot: a silent skip hides breakage.

    The one exception is ``cpp`` after an install that was told not to build the
    extension (``SPARSEVIT_BUILD_EXT=0`` in the environment): its tests skip, saying so.
    """
    from sparsevit.backend import _backend_error

    err = _backend_error(backend, device_for(backend).type)
    if err is None:
        return
    if backend == "cpp" and os.environ.get("SPARSEVIT_BUILD_EXT", "").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip(f"SPARSEVIT_BUILD_EXT=0: the C++ CPU kernels are not built ({err})")
    pytest.fail(f"backend {backend} should be available here but is not: {err}")


def tolerances(dtype: torch.dtype) -> dict:
    """assert_close tolerances per dtype (fp32 exact-ish; half types ~1e-2 relative)."""
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-4)
    return dict(atol=1e-2, rtol=1e-2)
