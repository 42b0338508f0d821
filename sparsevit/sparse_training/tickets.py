"""Tickets (sets of masks) saved to and loaded from files.

A ticket is a mapping ``layer name -> bool mask`` (unit masks: weight-shaped, or
``(M/b, K/b)`` blocks) plus string metadata.  Files are written with
safetensors when it is importable (no pickle: safe to load from anywhere), else
with ``torch.save`` (loaded with ``weights_only=True``).

Format version 2 (:data:`TICKET_FORMAT_VERSION`) stores, next to the masks, the
version and a sha256 checksum of the masks (:func:`ticket_checksum`), in the
safetensors metadata or the ``torch.save`` dict.  :func:`load_ticket` refuses every
bad file with a ValueError naming the file and the problem: missing, empty,
truncated or garbage, not a ticket, an unknown version, a missing checksum or one
that does not match the data, masks that are not bool, have fewer than 2 dims, or
hold bytes other than 0/1.  Files of the first format (no version, no checksum)
still load, with all the content checks and a UserWarning asking to re-save them:
they were written by this project, and refusing them would strand saved tickets.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Mapping, Optional, Union

import torch

__all__ = ["TICKET_FORMAT_VERSION", "load_ticket", "save_ticket", "safetensors_available", "ticket_checksum"]

PathLike = Union[str, "os.PathLike[str]"]

TICKET_FORMAT = "sparsevit-ticket"
TICKET_FORMAT_VERSION = 2  # 1: the first files, without a version or a checksum
_RESERVED = ("format", "format_version", "sha256")


def safetensors_available() -> bool:
    """True when ``safetensors.torch`` can be imported."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def ticket_checksum(masks: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over the masks in name order: ``name NUL dtype NUL shape NUL raw bytes`` per mask.

    Names, dtypes and shapes are part of the digest, so a renamed, retyped or
    reshaped mask fails the check as well as a flipped bit.
    """
    h = hashlib.sha256()
    for name in sorted(masks):
        t = masks[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_checksum = ticket_checksum


def _mask_problem(name: str, mask: object) -> Optional[str]:
    """Why ``mask`` is not a valid unit mask, or None."""
    if not isinstance(mask, torch.Tensor):
        return f"mask {name!r} must be a tensor, got {type(mask).__name__}"
    if mask.dtype != torch.bool:
        return f"mask {name!r} must be bool, got {mask.dtype}"
    if mask.dim() < 2:
        return f"mask {name!r} must have at least 2 dims (a weight-shaped or block mask), got shape {tuple(mask.shape)}"
    if mask.numel() and bool((mask.view(torch.uint8) > 1).any()):
        return f"mask {name!r} holds bytes other than 0/1 (a corrupted bool tensor)"
    return None


def _check_masks(masks: object) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping name -> bool tensor, got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"masks keys must be str, got {type(name).__name__}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool torch.Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        problem = _mask_problem(name, mask)
        if problem is not None:
            raise ValueError(f"masks: {problem}")
        out[name] = mask.detach().cpu().contiguous()
    return out


def save_ticket(
    path: PathLike,
    masks: "Mapping[str, torch.Tensor] | object",
    metadata: Optional[Mapping[str, str]] = None,
    *,
    use_safetensors: Optional[bool] = None,
) -> str:
    """Write ``masks`` (and str ``metadata``) to ``path``; returns the format used (``safetensors`` or ``torch``).

    ``use_safetensors``: None = when available; True requires it; False uses ``torch.save``.
    The file records :data:`TICKET_FORMAT_VERSION` and :func:`ticket_checksum` of the
    masks; the metadata keys ``format``, ``format_version`` and ``sha256`` are reserved.

    FSDP2: masks that are DTensors (a sharded manager's) are gathered whole (every rank
    must call), rank 0 writes the file and every rank returns once it is written; the
    file is the one an unsharded run with the same masks writes.

    ``masks`` may also be a :class:`~sparsevit.sparse_training.MaskManager`, or a trainer
    holding one (RigL, SET, StaticSparse, LotteryTicket): the file then describes itself
    (granularity, block size, layer shapes, method, sparsity; keys ``sparsevit.*``, see
    :mod:`sparsevit.sparse_training.ticket_apply`) and :func:`apply_ticket` applies it to
    a fresh model.  Metadata keys starting with ``sparsevit.`` are reserved.
    """
    from .ticket_apply import describe_manager, manager_of

    manager = manager_of(masks)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    for key in meta:
        if key in _RESERVED or key.startswith("sparsevit."):
            raise ValueError(f"metadata key {key!r} is reserved for the ticket format")
    if manager is not None:
        meta.update(describe_manager(manager, type(masks).__name__))
        masks = manager.masks()
    masks, gathered = _gather_sharded(masks)
    masks = _check_masks(masks)
    if gathered and _rank() != 0:  # FSDP2: rank 0 writes the one file; the others wait for it
        _barrier()
        return "safetensors" if (safetensors_available() if use_safetensors is None else use_safetensors) else "torch"
    try:
        return _write(path, masks, meta, use_safetensors)
    finally:
        if gathered:
            _barrier()


def _gather_sharded(masks: object) -> tuple[object, bool]:
    """Whole masks from FSDP2-sharded ones (DTensors; a collective every rank joins), and whether any was sharded."""
    from .sharding import is_dtensor

    if not isinstance(masks, Mapping) or not any(is_dtensor(m) for m in masks.values()):
        return masks, False
    whole = {}
    for name, mask in masks.items():
        if is_dtensor(mask):
            mask = mask.to(torch.uint8).full_tensor().to(torch.bool) if mask.dtype == torch.bool else mask.full_tensor()
        whole[name] = mask
    return whole, True


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _write(path: PathLike, masks: dict[str, torch.Tensor], meta: dict[str, str], use_safetensors: Optional[bool]) -> str:
    header = {"format": TICKET_FORMAT, "format_version": str(TICKET_FORMAT_VERSION), "sha256": ticket_checksum(masks)}
    if use_safetensors is None:
        use_safetensors = safetensors_available()
    if use_safetensors:
        from safetensors.torch import save_file

        save_file(masks, os.fspath(path), metadata={**header, **meta})
        return "safetensors"
    torch.save({**header, "masks": masks, "metadata": meta}, os.fspath(path))
    return "torch"


class _Bad(ValueError):
    """A problem with a ticket file, before the file's name is put in front."""


def _read_torch(path: str) -> tuple[dict, dict, Optional[str], Optional[str]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to parse is a damaged file
        raise _Bad(f"is truncated or corrupt (torch.load: {type(err).__name__}: {err})") from None
    if not isinstance(blob, dict) or blob.get("format") != TICKET_FORMAT:
        raise _Bad("is not a sparsevit ticket")
    masks, meta = blob.get("masks"), blob.get("metadata", {})
    if not isinstance(masks, dict) or not all(isinstance(k, str) for k in masks):
        raise _Bad("holds no mapping name -> mask")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _Bad("holds metadata that is not a mapping str -> str")
    version, digest = blob.get("format_version"), blob.get("sha256")
    return dict(masks), dict(meta), None if version is None else str(version), digest


def _read_safetensors(path: str) -> tuple[dict, dict, Optional[str], Optional[str]]:
    if not safetensors_available():
        raise _Bad("looks like a safetensors file but safetensors is not installed")
    from safetensors import safe_open

    try:
        masks = {}
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            for key in fh.keys():
                masks[key] = fh.get_tensor(key)
    except Exception as err:  # any failure to parse is a damaged file
        raise _Bad(f"is truncated or corrupt (safetensors: {type(err).__name__}: {err})") from None
    if meta.pop("format", None) != TICKET_FORMAT:
        raise _Bad("is not a sparsevit ticket")
    return masks, meta, meta.pop("format_version", None), meta.pop("sha256", None)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    size = os.path.getsize(path)
    if size == 0:
        raise _Bad("is empty")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: a little-endian u64 header size, then the JSON header.  Checked
    # first: a header size such as 0x180 starts with the byte of a pickle (0x80).
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        masks, meta, version, digest = _read_safetensors(path)
    elif head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch.save) or legacy pickle
        masks, meta, version, digest = _read_torch(path)
    elif len(head) == 9 and head[8:9] == b"{":
        raise _Bad("is truncated or corrupt (safetensors: the header runs past the end of the file)")
    else:
        raise _Bad("is neither a safetensors nor a torch.save file")
    if version is None:
        warnings.warn(
            f"ticket file {path!r} has no format version or checksum (written by an older sparsevit): loaded "
            "without an integrity check; re-save it with save_ticket",
            UserWarning,
            stacklevel=3,
        )
    elif version != str(TICKET_FORMAT_VERSION):
        raise _Bad(
            f"has format version {version!r}: format version {version!r} is not supported (this sparsevit reads "
            f"version {TICKET_FORMAT_VERSION} and legacy files without a version)"
        )
    elif digest is None:
        raise _Bad(f"is format version {version} but has no checksum (sha256)")
    else:
        not_tensors = [n for n, m in masks.items() if not isinstance(m, torch.Tensor)]
        if not_tensors:
            raise _Bad(f"holds a bad mask: {_mask_problem(not_tensors[0], masks[not_tensors[0]])}")
        actual = ticket_checksum(masks)
        if actual != digest:
            raise _Bad(f"fails its integrity check: checksum mismatch (stored sha256 {digest}, data has {actual})")
    for name, mask in masks.items():
        problem = _mask_problem(name, mask)
        if problem is not None:
            raise _Bad(f"holds a bad mask: {problem}")
    return masks, meta


def load_ticket(path: "PathLike | torch.nn.Module", *args: Any, **kwargs: Any):
    """Read a ticket written by :func:`save_ticket`: ``(masks, metadata)`` with CPU bool masks.

    Every bad file is a ValueError naming it and the problem (module docstring);
    a file of the first format, without version and checksum, loads with a UserWarning.

    ``load_ticket(model, path, optimizer=None)`` is :func:`apply_ticket`: the ticket
    applied to ``model``, returning its :class:`~sparsevit.sparse_training.MaskManager`.
    """
    if isinstance(path, torch.nn.Module):
        from .ticket_apply import apply_ticket

        return apply_ticket(path, *args, **kwargs)
    if args or kwargs:
        raise TypeError("load_ticket(path) takes only the path; load_ticket(model, path) applies it to a model")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"ticket file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"ticket file {path!r} is not a regular file")
    try:
        return _read(path)
    except _Bad as err:
        raise ValueError(f"ticket file {path!r} {err}") from None
