"""Triton kernels for token dropping: gather, scatter and scatter-add of token rows.

For ``x (B, N, C)`` and ``index (B, K)``:

* gather:      ``out[b, k, :] = x[b, index[b, k], :]``
* scatter:     ``out[b, index[b, k], :] = src[b, k, :]`` (``out`` pre-filled by the caller)
* scatter-add: ``out[b, index[b, k], :] += src[b, k, :]`` (``out`` fp32, zero-filled by the
  caller; atomics make repeated indices sum correctly)

Every kernel takes arbitrary strides, so non-contiguous views need no copy.  An
index outside ``[0, N)`` never touches memory out of bounds: gather writes zeros
for it, scatter and scatter-add skip it.  One program copies ``ROWS`` token rows
over a ``BLOCK_C`` slice of channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gather_tokens", "scatter_tokens", "scatter_add_tokens"]


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
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < K
    col_ok = cols < C
    idx = tl.load(idx_ptr + b * sib + rows * sik, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (idx >= 0) & (idx < N)
    idx = tl.where(valid, idx, 0)
    src = x_ptr + b * sxb + idx[:, None] * sxn + cols[None, :] * sxc
    vals = tl.load(src, mask=valid[:, None] & col_ok[None, :], other=0)
    dst = out_ptr + b * sob + rows[:, None].to(tl.int64) * sok + cols[None, :] * soc
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
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < K
    col_ok = cols < C
    idx = tl.load(idx_ptr + b * sib + rows * sik, mask=row_ok, other=0).to(tl.int64)
    valid = row_ok & (idx >= 0) & (idx < N)
    idx = tl.where(valid, idx, 0)
    mask = valid[:, None] & col_ok[None, :]
    src = src_ptr + b * ssb + rows[:, None].to(tl.int64) * ssk + cols[None, :] * ssc
    vals = tl.load(src, mask=mask, other=0)
    dst = out_ptr + b * sob + idx[:, None] * son + cols[None, :] * soc
    if ACCUMULATE:
        tl.atomic_add(dst, vals.to(tl.float32), mask=mask)
    else:
        tl.store(dst, vals, mask=mask)


def _launch_config(K: int, C: int) -> tuple[int, int]:
    """Rows per program and channel block: ~4K elements per program, whole rows when they fit."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    rows = max(1, min(4096 // block_c, triton.next_power_of_2(max(K, 1))))
    return rows, block_c


def _launch(kernel, first: torch.Tensor, index: torch.Tensor, second: torch.Tensor, N: int, **constexprs) -> None:
    """Launch a row kernel over (B, K-row blocks, C blocks) for ``index (B, K)`` and C channels."""
    (B, K), C = index.shape, first.shape[2]
    rows, block_c = _launch_config(K, C)
    grid = (B, triton.cdiv(K, rows), triton.cdiv(C, block_c))
    kernel[grid](
        first, index, second, K, N, C,
        *first.stride(), *index.stride(), *second.stride(),
        ROWS=rows, BLOCK_C=block_c, **constexprs,
    )


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, index[b, k]]``; ``x (B, N, C)``, integer ``index (B, K)`` -> ``(B, K, C)``."""
    B, N, C = x.shape
    out = torch.empty((B, index.shape[1], C), dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        _launch(_gather_tokens_kernel, x, index, out, N)
    return out


def scatter_tokens(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """In place: ``out[b, index[b, k]] = src[b, k]``; returns ``out (B, N, C)``."""
    if src.numel() > 0:
        _launch(_scatter_tokens_kernel, src, index, out, out.shape[1], ACCUMULATE=False)
    return out


def scatter_add_tokens(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """In place: ``out[b, index[b, k]] += src[b, k]`` with ``out`` float32; returns ``out``."""
    if out.dtype != torch.float32:
        raise TypeError(f"out must be float32 for scatter-add accumulation, got {out.dtype}")
    if src.numel() > 0:
        _launch(_scatter_tokens_kernel, src, index, out, out.shape[1], ACCUMULATE=True)
    return out
