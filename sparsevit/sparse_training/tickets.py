"""Tickets (sets of masks) saved to and loaded from files.

A ticket is a mapping ``layer name -> bool mask`` (unit masks: weight-shaped, or
``(M/b, K/b)`` blocks) plus string metadata.  Files are written with
safetensors when it is importable (no pickle: safe to load from anywhere), else
with ``torch.save`` (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch

__all__ = ["load_ticket", "save_ticket", "safetensors_available"]

PathLike = Union[str, "os.PathLike[str]"]


def safetensors_available() -> bool:
    """True when ``safetensors.torch`` can be imported."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _check_masks(masks: object) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool tensor, got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"masks keys must be str, got {type(name).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool torch.Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        out[name] = mask.detach().cpu().contiguous()
    return out


def save_ticket(
    path: PathLike,
    masks: Mapping[str, torch.Tensor],
    metadata: Optional[Mapping[str, str]] = None,
    *,
    use_safetensors: Optional[bool] = None,
) -> str:
    """Write ``masks`` (and str ``metadata``) to ``path``; returns the format used (``safetensors`` or ``torch``).

    ``use_safetensors``: None = when available; True requires it; False uses ``torch.save``.
    """
    masks = _check_masks(masks)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if use_safetensors is None:
        use_safetensors = safetensors_available()
    if use_safetensors:
        from safetensors.torch import save_file

        save_file(masks, os.fspath(path), metadata={"format": "sparsevit-ticket", **meta})
        return "safetensors"
    torch.save({"format": "sparsevit-ticket", "masks": masks, "metadata": meta}, os.fspath(path))
    return "torch"


def load_ticket(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ticket written by :func:`save_ticket`: ``(masks, metadata)`` with CPU bool masks."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"path {path!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or legacy pickle
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != "sparsevit-ticket":
            raise ValueError(f"{path!r} is not a sparsevit ticket")
        return dict(blob["masks"]), dict(blob["metadata"])
    if not safetensors_available():
        raise ValueError(f"{path!r} looks like a safetensors file but safetensors is not installed")
    from safetensors import safe_open

    masks = {}
    with safe_open(path, framework="pt", device="cpu") as fh:
        meta = dict(fh.metadata() or {})
        for key in fh.keys():
            masks[key] = fh.get_tensor(key)
    if meta.pop("format", None) != "sparsevit-ticket":
        raise ValueError(f"{path!r} is not a sparsevit ticket")
    return masks, meta
