"""Triton kernels for block-sparse matmul: products over a block layout.

Two kernels serve the three products (dds, dsd, sdd) of
:mod:`sparsevit.ops.block_sparse_matmul`:

* ``rowlist``: ``out[t] (R, N) = A (R, Q) @ x[t] (Q, N)`` for a block-sparse ``A`` given as
  *row lists*: for block row ``i`` the entries ``offsets[i] : offsets[i+1]`` name the
  block column ``indices[e]`` and the packed block ``perm[e]`` (or ``e``), read with
  element strides ``(s_vr, s_vc)`` -- ``(b, 1)`` as stored, ``(1, b)`` transposed.
  This is ``dsd`` directly (BSR for ``S``, BSC with transposed blocks for ``Sᵀ``), and
  ``dds`` through ``a @ B = (Bᵀ @ aᵀ)ᵀ`` with ``aᵀ`` and ``outᵀ`` as strided views.
  Each program owns a ``BLOCK_M × BLOCK_N`` tile of one block row and loops over that
  row's nonzero blocks; an empty block row writes zeros.  Programs are ordered in
  groups of ``GROUP`` block rows per column tile so the dense tile stays in L2.
* ``sdd``: ``values[t] = Σ_batch a[:, rows(i_t), :] @ b[:, :, cols(j_t)]`` for each kept
  block ``t`` at ``(i_t, j_t)`` only.

Both accumulate in fp32 (``tl.dot`` on tensor cores for fp16/bf16; fp32 inputs use
IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32``; see ``_precision`` for the
interpreter's bf16) and take arbitrary
strides, so transposed operands need no copy.  Configurations are autotuned per
block size, dtype and problem size; under the Triton interpreter one small fixed
configuration is used.  A batch larger than the grid's axis-1 limit
(:data:`MAX_GRID_DIM`) is launched in chunks.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["rowlist_matmul", "dsd", "dds", "sdd"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _precision(dtype: torch.dtype) -> dict:
    """``PRECISION`` of fp32 dots and ``UPCAST``: the interpreter's bf16 ``tl.dot`` returns
    garbage (Triton 3.8), so there bf16 tiles are widened to fp32 first (exact)."""
    upcast = dtype == torch.bfloat16 and _interpreting()
    ieee = upcast or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return dict(PRECISION="ieee" if ieee else "tf32", UPCAST=upcast)


@triton.jit
def _rowlist_kernel(
    values_ptr, offsets_ptr, indices_ptr, perm_ptr,
    x_ptr, out_ptr,
    N, num_row_blocks,
    s_vr, s_vc,
    sxb, sxq, sxn,
    sob, som, son,
    HAS_PERM: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    bt = tl.program_id(1).to(tl.int64)
    SUB: tl.constexpr = BS // BLOCK_M
    num_rows = num_row_blocks * SUB  # output row tiles
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP row tiles share one column tile of x before moving on.
    in_group = GROUP * num_n
    first = (pid // in_group) * GROUP
    size = tl.minimum(num_rows - first, GROUP)
    row_tile = first + (pid % in_group) % size
    pid_n = (pid % in_group) // size
    row = row_tile // SUB
    r0 = (row_tile % SUB) * BLOCK_M

    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    start = tl.load(offsets_ptr + row)
    end = tl.load(offsets_ptr + row + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_base = x_ptr + bt * sxb + offs_n[None, :].to(tl.int64) * sxn
    zero64 = (pid * 0).to(tl.int64)  # loop counters are plain ints in the interpreter
    for e in range(start, end):
        col = tl.load(indices_ptr + e).to(tl.int64)
        if HAS_PERM:
            p = tl.load(perm_ptr + e).to(tl.int64)
        else:
            p = zero64 + e
        blk = values_ptr + p * (BS * BS) + (r0 + offs_m)[:, None] * s_vr
        for k0 in range(0, BS, BLOCK_K):
            a = tl.load(blk + (k0 + offs_k)[None, :] * s_vc)
            q = col * BS + k0 + offs_k
            x = tl.load(x_base + q[:, None] * sxq, mask=n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(a, x, acc, input_precision=PRECISION)
    rows = (row * BS + r0 + offs_m).to(tl.int64)
    dst = out_ptr + bt * sob + rows[:, None] * som + offs_n[None, :].to(tl.int64) * son
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _sdd_kernel(
    a_ptr, b_ptr, out_ptr, row_idx_ptr, col_idx_ptr,
    BT, R,
    sab, sam, sar,
    sbb, sbr, sbn,
    BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    sub = tl.program_id(1)
    SUB_N: tl.constexpr = BS // BLOCK_N
    r0 = (sub // SUB_N) * BLOCK_M
    c0 = (sub % SUB_N) * BLOCK_N
    i = tl.load(row_idx_ptr + t).to(tl.int64)
    j = tl.load(col_idx_ptr + t).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (i * BS + r0 + offs_m)[:, None] * sam
    b_cols = b_ptr + (j * BS + c0 + offs_n)[None, :] * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.cdiv(R, BLOCK_K)
    zero64 = t * 0  # loop counters are plain ints in the interpreter
    for it in range(0, BT * num_k):
        bt = zero64 + it // num_k
        k = (it % num_k) * BLOCK_K + offs_k
        k_ok = k < R
        k64 = k.to(tl.int64)
        a = tl.load(a_rows + bt * sab + k64[None, :] * sar, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_cols + bt * sbb + k64[:, None] * sbr, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dst = out_ptr + t * (BS * BS) + (r0 + offs_m)[:, None] * BS + (c0 + offs_n)[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------
def _rowlist_configs(bs: int) -> list:
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (32, 64, 128):
            for bk in (16, 32, 64):
                if bm > bs or bk > bs or bm * bn > 128 * 128:
                    continue
                for stages, warps in ((3, 4), (4, 4), (3, 8)):
                    if warps == 8 and bm * bn < 64 * 128:
                        continue
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP": 8},
                                             num_stages=stages, num_warps=warps))
    return out


def _sdd_configs(bs: int) -> list:
    out = []
    for bm in (16, 32, 64, 128):
        for bk in (32, 64):
            if bm > bs:
                continue
            for stages, warps in ((3, 4), (4, 4), (3, 8)):
                if warps == 8 and bm < 64:
                    continue
                out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bm, "BLOCK_K": bk}, num_stages=stages, num_warps=warps))
    return out


@functools.lru_cache(maxsize=None)
def _tuned_rowlist(bs: int):
    return triton.autotune(configs=_rowlist_configs(bs), key=["N", "num_row_blocks", "HAS_PERM"])(_rowlist_kernel)


@functools.lru_cache(maxsize=None)
def _tuned_sdd(bs: int):
    return triton.autotune(configs=_sdd_configs(bs), key=["BT", "R"])(_sdd_kernel)


_FIXED = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}  # the interpreter's one configuration

MAX_GRID_DIM = 65535  # CUDA's limit on grid axes 1 and 2 (the rowlist batch axis)


# ----------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------
def rowlist_matmul(
    values: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    perm: "torch.Tensor | None",
    transpose_blocks: bool,
    x: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """In place: ``out[t] = A @ x[t]`` for ``A`` given by its row lists (module docstring).

    values (nnz, b, b) contiguous; offsets (R/b + 1,), indices/perm (nnz,) int32;
    x (T, Q, N) and out (T, R, N) with any strides.  Returns ``out``.
    """
    bs = values.shape[-1]
    T, R, N = out.shape
    if out.numel() == 0:
        return out
    # The batch runs on grid axis 1 (at most MAX_GRID_DIM programs): a larger batch is
    # launched in chunks, on slices of x and out (views).
    for start in range(0, T, MAX_GRID_DIM):
        chunk = slice(start, min(T, start + MAX_GRID_DIM))
        _launch_rowlist(values, offsets, indices, perm, transpose_blocks, x[chunk], out[chunk])
    return out


def _launch_rowlist(values, offsets, indices, perm, transpose_blocks: bool, x: torch.Tensor, out: torch.Tensor) -> None:
    """One launch of the rowlist kernel for ``out (T, R, N)`` with ``T <= MAX_GRID_DIM``."""
    bs = values.shape[-1]
    T, _, N = out.shape
    num_row_blocks = offsets.numel() - 1
    s_vr, s_vc = (1, bs) if transpose_blocks else (bs, 1)
    args = (
        values, offsets, indices, perm if perm is not None else indices, x, out,
        N, num_row_blocks, s_vr, s_vc,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
    )
    consts = dict(HAS_PERM=perm is not None, BS=bs, **_precision(values.dtype))
    if _interpreting():
        cfg = dict(_FIXED, GROUP=2)
        grid = (num_row_blocks * (bs // cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), T)
        _rowlist_kernel[grid](*args, **consts, **cfg)
    else:
        def grid(meta):
            return (num_row_blocks * (bs // meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), T)

        _tuned_rowlist(bs)[grid](*args, **consts)


def dsd(values, offsets, indices, perm, transpose_blocks: bool, b: torch.Tensor, rows: int) -> torch.Tensor:
    """``A @ b[t]`` for ``b (T, Q, N)`` and ``A (rows, Q)`` given by row lists -> ``(T, rows, N)``."""
    out = torch.empty((b.shape[0], rows, b.shape[2]), dtype=b.dtype, device=b.device)
    return rowlist_matmul(values, offsets, indices, perm, transpose_blocks, b, out)


def dds(a: torch.Tensor, values, offsets, indices, perm, transpose_blocks: bool, cols: int) -> torch.Tensor:
    """``a[t] @ B`` for ``a (T, P, Q)``, where ``Bᵀ (cols, Q)`` is given by row lists -> ``(T, P, cols)``."""
    out = torch.empty((a.shape[0], a.shape[1], cols), dtype=a.dtype, device=a.device)
    rowlist_matmul(values, offsets, indices, perm, transpose_blocks, a.transpose(1, 2), out.transpose(1, 2))
    return out


def sdd(a: torch.Tensor, b: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, block_size: int) -> torch.Tensor:
    """The kept blocks of ``Σ_t a[t] @ b[t]``: a (T, M, R), b (T, R, N) -> (nnz, b, b)."""
    bs = block_size
    nnz = col_indices.numel()
    out = torch.empty((nnz, bs, bs), dtype=a.dtype, device=a.device)
    if nnz == 0:
        return out
    BT, _, R = a.shape
    if BT * R == 0:
        return out.zero_()
    args = (
        a, b, out, row_indices, col_indices, BT, R,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
    )
    consts = dict(BS=bs, **_precision(a.dtype))
    if _interpreting():
        cfg = _FIXED
        _sdd_kernel[(nnz, (bs // 16) ** 2)](*args, **consts, **cfg)
    else:
        def grid(meta):
            return (nnz, (bs // meta["BLOCK_M"]) * (bs // meta["BLOCK_N"]))

        _tuned_sdd(bs)[grid](*args, **consts)
    return out
