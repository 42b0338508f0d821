"""Pure-PyTorch references of every sparsevit op: the specification.

Each function here is plain differentiable torch; the kernels in ``kernels/`` and
``csrc/`` are tested against it, forward and backward.  They are also the
``torch`` backend of each op.

Token dropping (DynamicViT, Rao et al. 2021, Sec. 3.4; data-level tickets, Shen et
al. 2023): with ``x (B, N, C)`` and an integer ``index (B, K)``,

* ``gather_tokens``:      ``out[b, k] = x[b, index[b, k]]``, zero where the index is
  outside ``[0, N)``;
* ``scatter_tokens``:     ``out = base``; ``out[b, index[b, k]] = src[b, k]``, skipping
  indices outside ``[0, N)``; with a repeated index one of the rows wins (which
  one is unspecified);
* ``scatter_add_tokens``: ``out = 0``; ``out[b, index[b, k]] += src[b, k]`` summed in
  float32 and cast to the dtype of ``src``, skipping indices outside ``[0, n)``;
* ``select_tokens``: the ``num_prefix`` leading tokens plus the ``keep`` highest
  scoring others, in position or score order.
"""

from __future__ import annotations

import torch

__all__ = ["gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens"]


def _flat_rows(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row numbers into a (B·(N+1), C) view, out-of-range entries sent to row N of their batch.

    Returns ``(flat (B·K,), valid (B, K))``; row N of each batch is a spill row.
    """
    valid = (index >= 0) & (index < n)
    spill = torch.where(valid, index, torch.full_like(index, n)).long()
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * (n + 1)
    return (spill + offsets).reshape(-1), valid


def _with_spill_row(t: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B·(N+1), C) with a zero row appended to every batch."""
    b, _, c = t.shape
    return torch.cat([t, t.new_zeros(b, 1, c)], dim=1).reshape(-1, c)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, k, :] = x[b, index[b, k], :]`` (zero for an index outside ``[0, N)``).

    x: (B, N, C); index: (B, K) integer -> (B, K, C).
    """
    b, n, c = x.shape
    flat, _ = _flat_rows(index, n)
    return _with_spill_row(x).index_select(0, flat).view(b, index.shape[1], c)


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``out = base``; ``out[b, index[b, k], :] = src[b, k, :]`` (out-of-range indices skipped).

    src: (B, K, C); index: (B, K) integer; base: (B, N, C) -> (B, N, C).
    """
    b, n, c = base.shape
    flat, _ = _flat_rows(index, n)
    out = _with_spill_row(base).index_copy(0, flat, src.reshape(-1, c))
    return out.view(b, n + 1, c)[:, :n]


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``out[b, i, :] = Σ_{k : index[b, k] = i} src[b, k, :]`` in float32, cast to ``src.dtype``.

    src: (B, K, C); index: (B, K) integer -> (B, n, C).  The adjoint of :func:`gather_tokens`.
    """
    b, _, c = src.shape
    flat, _ = _flat_rows(index, n)
    acc = src.new_zeros((b * (n + 1), c), dtype=torch.float32)
    acc = acc.index_add(0, flat, src.reshape(-1, c).float())
    return acc.view(b, n + 1, c)[:, :n].to(src.dtype)


def select_index(scores: torch.Tensor, keep: int, num_prefix: int, order: str) -> torch.Tensor:
    """Indices (B, num_prefix + keep) of the prefix tokens and the ``keep`` best others.

    ``scores (B, N - num_prefix)`` rank the non-prefix tokens (higher is kept).
    ``order="position"`` sorts the kept indices ascending; ``"score"`` keeps them in
    descending score order.  The prefix indices ``0..num_prefix-1`` always come first.
    """
    b = scores.shape[0]
    top = torch.topk(scores, keep, dim=1, largest=True, sorted=True).indices
    if order == "position":
        top = torch.sort(top, dim=1).values
    prefix = torch.arange(num_prefix, device=scores.device).expand(b, num_prefix)
    return torch.cat([prefix, top + num_prefix], dim=1)


def select_tokens(
    x: torch.Tensor, scores: torch.Tensor, keep: int, num_prefix: int = 1, order: str = "position"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``num_prefix`` leading tokens and the ``keep`` highest-scoring others.

    x: (B, N, C); scores: (B, N - num_prefix) -> tokens (B, num_prefix + keep, C), index.
    """
    index = select_index(scores, keep, num_prefix, order)
    return gather_tokens(x, index), index
