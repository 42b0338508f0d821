"""The ``torch`` backend of the token ops: the reference semantics at index_select speed.

``sparsevit.reference`` states the semantics with a spill row appended to every batch
(a copy of the whole input); these run inside the custom ops, below autograd, so they
may use in-place updates and boolean selection instead and touch only the K rows:

* gather:      ``out = x.view(B·N, C)[b·N + index]``, rows with an index outside
  ``[0, N)`` zeroed;
* scatter:     ``out = base``; ``out.view(B·N, C)[b·N + index] = src`` for valid indices
  (distinct: the op resolves repeats, last one wins, before calling);
* scatter-add: float32 ``index_add`` of the valid rows, cast to ``src.dtype``.
"""

from __future__ import annotations

import torch

__all__ = ["gather_tokens", "scatter_tokens", "scatter_add_tokens"]


def _flat(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row numbers ``b·n + index`` into a (B·n, C) view, and the validity mask (B·K,)."""
    valid = ((index >= 0) & (index < n)).reshape(-1)
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * n
    return (index.clamp(0, max(n - 1, 0)) + offsets).reshape(-1), valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, index[b, k]]`` (zero rows for out-of-range indices)."""
    b, n, c = x.shape
    k = index.shape[1]
    if n == 0:
        return x.new_zeros(b, k, c)
    flat, valid = _flat(index, n)
    out = x.reshape(b * n, c).index_select(0, flat)
    if not bool(valid.all()):  # rare (check_index=False with bad entries): skip the pass otherwise
        out.masked_fill_(~valid.unsqueeze(1), 0)
    return out.view(b, k, c)


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``out = base``; ``out[b, index[b, k]] = src[b, k]`` for in-range indices."""
    b, n, c = base.shape
    out = base.contiguous().clone()
    if src.numel() == 0 or n == 0:
        return out
    flat, valid = _flat(index, n)
    rows = src.reshape(-1, c)
    if not bool(valid.all()):
        flat, rows = flat[valid], rows[valid]
    out.view(b * n, c).index_copy_(0, flat, rows)
    return out


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``out[b, i] = Σ_{k: index[b, k] = i} src[b, k]`` in float32, cast to ``src.dtype``."""
    b, _, c = src.shape
    acc = torch.zeros(b * n, c, dtype=torch.float32, device=src.device)
    if src.numel() and n:
        flat, valid = _flat(index, n)
        rows = src.reshape(-1, c)
        if not bool(valid.all()):
            flat, rows = flat[valid], rows[valid]
        acc.index_add_(0, flat, rows.float())
    return acc.view(b, n, c).to(src.dtype)
