"""Helpers shared by the tests: backends to run, devices, tolerances."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_params() -> list:
    """Every backend as a pytest param; ``cuda`` carries the gpu marker."""
    return [
        pytest.param("torch", id="torch"),
        pytest.param("triton", id="triton"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]


def device_for(backend: str) -> torch.device:
    """Where a backend's tests run: CUDA when present (always for ``cuda``), else the CPU."""
    return torch.device("cuda" if CUDA or backend == "cuda" else "cpu")


def require_backend(backend: str) -> None:
    """Fail (not skip) when a backend that should run here cannot: a silent skip hides breakage."""
    from sparsevit.backend import _backend_error

    err = _backend_error(backend, device_for(backend).type)
    if err is not None:
        pytest.fail(f"backend {backend} should be available here but is not: {err}")


def tolerances(dtype: torch.dtype) -> dict:
    """assert_close tolerances per dtype (fp32 exact-ish; half types ~1e-2 relative)."""
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-4)
    return dict(atol=1e-2, rtol=1e-2)
