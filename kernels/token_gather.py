"""Triton kernels for token dropping: gather, scatter and scatter-add of token rows.

For ``x (B, N, C)`` and ``index (B, K)``:

* gather:      ``out[b, k, :] = x[b, index[b, k], :]``
* scatter:     ``out[b, index[b, k], :] = src[b, k, :]`` (``out`` pre-filled by the caller;
  the caller resolves repeated indices first, so every destination has one writer)
* scatter-add: ``out[b, index[b, k], :] += src[b, k, :]`` (``out`` fp32, zero-filled by the
  caller; atomics make repeated indices sum correctly, in a run-dependent order)
* deterministic scatter-add: ``out[b, i, :] = Σ_{k ascending: index[b, k] = i} src[b, k, :]``
  as a segment sum over the entries sorted by destination: no atomics, the same bits
  on every run (and those of a sequential fp32 sum in ``k`` order).

Every kernel takes arbitrary strides, so non-contiguous views need no copy, and
computes element offsets in int64, so a view whose strides reach past 2³¹ elements
(e.g. a transposed ``(B, C, N)`` tensor with ``C·N ≥ 2³¹``) is addressed correctly.  An
index outside ``[0, N)`` never touches memory out of bounds: gather writes zeros
for it, scatter and scatter-add skip it.  One program copies ``ROWS`` token rows
over a ``BLOCK_C`` slice of channels.

CUDA limits grid axes 1 and 2 to 65,535 programs (axis 0 to 2³¹ − 1).  Larger
problems are launched in chunks of at most :data:`MAX_GRID_DIM` programs per axis
(slices of the same tensors: views, no copies), so any size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_tokens", "scatter_tokens", "scatter_add_tokens", "scatter_add_tokens_deterministic"]

MAX_GRID_DIM = 65535  # CUDA's limit on grid axes 1 and 2
MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0


@triton.jit
def _gather_tokens_kernel(
    x_ptr, idx_ptr, out_ptr,
    K, N, C,
    sxb, sxn, sxc,
    sib, sik,
    sob, sok, soc,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = (tl.program_id(1) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    row_ok = rows < K
    col_ok = cols < C
    idx = tl.load(idx_ptr + b * sib + rows * sik, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (idx >= 0) & (idx < N)
    idx = tl.where(valid, idx, 0)
    src = x_ptr + b * sxb + idx[:, None] * sxn + cols[None, :] * sxc
    vals = tl.load(src, mask=valid[:, None] & col_ok[None, :], other=0)
    dst = out_ptr + b * sob + rows[:, None] * sok + cols[None, :] * soc
    tl.store(dst, vals, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_tokens_kernel(
    src_ptr, idx_ptr, out_ptr,
    K, N, C,
    ssb, ssk, ssc,
    sib, sik,
    sob, son, soc,
    ACCUMULATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = (tl.program_id(1) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    row_ok = rows < K
    col_ok = cols < C
    idx = tl.load(idx_ptr + b * sib + rows * sik, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (idx >= 0) & (idx < N)
    idx = tl.where(valid, idx, 0)
    mask = valid[:, None] & col_ok[None, :]
    src = src_ptr + b * ssb + rows[:, None] * ssk + cols[None, :] * ssc
    vals = tl.load(src, mask=mask, other=0)
    dst = out_ptr + b * sob + idx[:, None] * son + cols[None, :] * soc
    if ACCUMULATE:
        tl.atomic_add(dst, vals.to(tl.float32), mask=mask)
    else:
        tl.store(dst, vals, mask=mask)


@triton.jit
def _segment_sum_kernel(
    src_ptr, order_ptr, offsets_ptr, out_ptr,
    row0, N, C,
    ssb, ssk, ssc,
    sob, son, soc,
    BLOCK_C: tl.constexpr,
):
    # One program sums the source rows of one destination row r = b·N + i, in the
    # order of `order` (ascending k): a fixed order, hence reproducible bits.
    r = row0 + tl.program_id(0).to(tl.int64)
    b = r // N
    i = r - b * N
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    col_ok = cols < C
    start = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    src_b = src_ptr + b * ssb + cols * ssc
    for e in range(start, end):
        k = tl.load(order_ptr + e).to(tl.int64)
        acc += tl.load(src_b + k * ssk, mask=col_ok, other=0).to(tl.float32)
    tl.store(out_ptr + b * sob + i * son + cols * soc, acc, mask=col_ok)


def _launch_config(K: int, C: int) -> tuple[int, int]:
    """Rows per program and channel block: ~4K elements per program, whole rows when they fit."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    rows = max(1, min(4096 // block_c, triton.next_power_of_2(max(K, 1))))
    return rows, block_c


def _spans(total: int, step: int) -> list[slice]:
    """``[0, total)`` cut into slices of at most ``step``."""
    return [slice(start, min(total, start + step)) for start in range(0, total, step)]


def _launch(kernel, first: torch.Tensor, index: torch.Tensor, second: torch.Tensor, N: int,
            rows_of: str, **constexprs) -> None:
    """Launch a row kernel over (B, K-row blocks, C blocks) for ``index (B, K)`` and C channels.

    ``rows_of`` names the tensor indexed by k (``"first"``: scatter's src, ``"second"``:
    gather's out); the other one is indexed by token.  A grid axis past its limit is
    split into several launches on slices of the tensors.
    """
    (B, K), C = index.shape, first.shape[2]
    rows, block_c = _launch_config(K, C)
    for bs in _spans(B, MAX_GRID_X):
        for ks in _spans(K, rows * MAX_GRID_DIM):
            for cs in _spans(C, block_c * MAX_GRID_DIM):
                a = first[bs, ks, cs] if rows_of == "first" else first[bs, :, cs]
                o = second[bs, ks, cs] if rows_of == "second" else second[bs, :, cs]
                idx = index[bs, ks]
                k, c = idx.shape[1], a.shape[2]
                grid = (idx.shape[0], triton.cdiv(k, rows), triton.cdiv(c, block_c))
                kernel[grid](
                    a, idx, o, k, N, c,
                    *a.stride(), *idx.stride(), *o.stride(),
                    ROWS=rows, BLOCK_C=block_c, **constexprs,
                )


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, index[b, k]]``; ``x (B, N, C)``, integer ``index (B, K)`` -> ``(B, K, C)``."""
    B, N, C = x.shape
    out = torch.empty((B, index.shape[1], C), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        _launch(_gather_tokens_kernel, x, index, out, N, "second")
    return out


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """In place: ``out[b, index[b, k]] = src[b, k]``; returns ``out (B, N, C)``.

    With a repeated index the writers race (the result may mix rows): resolve
    repeats before calling (``sparsevit.scatter_tokens`` does).
    """
    if src.numel() > 0:
        _launch(_scatter_tokens_kernel, src, index, out, out.shape[1], "first", ACCUMULATE=False)
    return out


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """In place: ``out[b, index[b, k]] += src[b, k]`` with ``out`` float32; returns ``out``.

    Float atomics: repeated indices sum in a run-dependent order.  See
    :func:`scatter_add_tokens_deterministic` for reproducible bits.
    """
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32 for scatter-add accumulation, got {out.dtype}")
    if src.numel() > 0:
        _launch(_scatter_tokens_kernel, src, index, out, out.shape[1], "first", ACCUMULATE=True)
    return out


def scatter_add_tokens_deterministic(src: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``out[b, i] = Σ_{k ascending: index[b, k] = i} src[b, k]`` in float32 -> ``(B, n, C)`` float32.

    A sort-based segment sum: the (B·K) entries are stably sorted by destination
    ``b·n + index[b, k]`` (out-of-range entries last, never read), and one program per
    destination row adds its sources in ascending ``k``.  No atomics, so the result is
    bitwise reproducible.
    """
    B, K, C = src.shape
    out = torch.zeros((B, n, C), dtype=torch.float32, device=src.device)
    if src.numel() == 0 or n == 0:
        return out
    valid = (index >= 0) & (index < n)
    batch_rows = torch.arange(B, device=index.device).unsqueeze(1) * n
    key = torch.where(valid, index.long() + batch_rows, B * n).reshape(-1)
    order = torch.argsort(key, stable=True)
    # order holds flat positions b·K + k; the kernel reads src[b, k] with k = position mod K.
    order_k = (order % K).to(torch.int64)
    counts = torch.bincount(key, minlength=B * n + 1)[: B * n]
    offsets = torch.zeros(B * n + 1, dtype=torch.int64, device=src.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    _, block_c = _launch_config(K, C)
    for rs in _spans(B * n, MAX_GRID_X):
        for cs in _spans(C, block_c * MAX_GRID_DIM):
            a, o = src[:, :, cs], out[:, :, cs]
            grid = (rs.stop - rs.start, triton.cdiv(a.shape[2], block_c))
            _segment_sum_kernel[grid](
                a, order_k, offsets, o,
                rs.start, n, a.shape[2],
                *a.stride(), *o.stride(),
                BLOCK_C=block_c,
            )
    return out
