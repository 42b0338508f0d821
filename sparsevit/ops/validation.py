"""Argument checks shared by the public ops.

Bad input must fail early with a ``TypeError``/``ValueError`` that names the
argument and what was expected, never deep inside a kernel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "check_tensor",
    "check_same_device",
    "check_float",
    "check_index_tensor",
    "check_index_range",
    "data_check",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_tensor(name: str, value: object, ndim: int, dims: str) -> torch.Tensor:
    """``value`` must be a tensor of rank ``ndim``; ``dims`` names its dims, e.g. ``"(B, N, C)"``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {dims}, got shape {tuple(value.shape)}")
    return value


def check_float(name: str, t: torch.Tensor) -> None:
    """``t`` must be float32, float16 or bfloat16."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_index_tensor(name: str, t: torch.Tensor) -> None:
    """``t`` must hold integers (not bool, not float)."""
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {t.dtype}")


def check_same_device(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """All tensors must be on the device of the first."""
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} must be on the same device as {first_name} ({first.device}), got {t.device}")


def data_check(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` when the 0-dim bool ``condition`` is False.

    Eager mode syncs with the device to decide.  Under ``torch.compile`` the check
    becomes an asynchronous device assert (``torch._assert_async``), which keeps
    the graph whole; there a failure surfaces as a RuntimeError.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message)


def check_index_range(name: str, index: torch.Tensor, size: int, size_name: str) -> None:
    """Every entry of ``index`` must lie in ``[0, size)`` (one device sync in eager mode)."""
    if index.numel() == 0:
        return
    ok = (index.min() >= 0) & (index.max() < size)
    data_check(ok, f"{name} entries must lie in [0, {size_name}={size}), found one outside")


def check_int(name: str, value: object, minimum: int = 0) -> int:
    """``value`` must be an int (not bool) >= ``minimum``: TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def optional_int(name: str, value: object, minimum: int = 0) -> Optional[int]:
    """``value`` must be None or an int (not bool) >= ``minimum``."""
    return None if value is None else check_int(name, value, minimum)
