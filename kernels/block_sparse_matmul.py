"""Triton kernels for block-sparse matmul, tiled for tensor cores (Hopper ``wgmma``) and L2.

Two product kernels and one reduction serve the three products (dds, dsd, sdd) of
:mod:`sparsevit.ops.block_sparse_matmul`; ``b`` below is the block size.

``_dds_kernel``: tokens on M
    ``out[t] (M, N) = a[t] (M, Q) @ B (Q, N)`` for a block-sparse ``B`` given by its
    *column lists*, i.e. the row lists of ``Bᵀ``: for block column ``j`` of ``B`` the
    entries ``offsets[j] : offsets[j+1]`` name the block row ``indices[e]`` of ``B`` (a
    ``b``-wide slice of the contraction) and the packed block ``perm[e]`` (or ``e``),
    which holds ``Bᵀ``'s block ``(j, indices[e])`` read with element strides
    ``(s_vn, s_vk)`` -- ``(b, 1)`` as stored, ``(1, b)`` transposed.  The dense operand's
    rows -- the tokens, with the batch folded in (a ``(T, P, Q)`` input whose ``T`` and
    ``P`` dims merge into one strided dim is read as ``(T·P, Q)``; otherwise the batch
    runs on grid axis 1) -- are the MMA's M dimension, so ``BLOCK_M`` (64 or 128 rows
    of tokens) does not depend on the block size and every block size 16-128 gets
    64/128-row ``wgmma`` tiles; ``BLOCK_N`` is ``b`` or a divisor of it and ``BLOCK_K`` a
    divisor of ``b``.  One program owns a ``BLOCK_M × BLOCK_N`` tile of one block column
    and runs one flat loop over that column's nonzero blocks × ``b/BLOCK_K`` k-steps.
    This is ``dds`` and its input gradient directly, and ``dsd`` through
    ``A @ b = (bᵀ @ Aᵀ)ᵀ`` (the column lists of ``Aᵀ`` are the row lists of ``A``) on
    strided views, so ``dsd``'s tokens (the columns of ``b``) are on M as well.

    *Rasterisation*: program id ``pid = m_tile · n_tiles + n_tile``, the weight's column
    tile fastest.  Consecutive programs -- the ones running at the same time -- share
    one tile of the activation, which is therefore read from DRAM about once, while
    the small weight (a few MB) stays resident in L2 for every token tile.

    *Index prefetch*: the block-list entry for the next block is loaded one block
    ahead and carried through the loop, so the tile loads of a step depend only on
    loop-carried values, never on a load of the same step: the software pipeliner
    keeps ``num_stages`` tiles in flight instead of the one or two it allows behind a
    dependent index load.

``_sdd_kernel``: sampled product with split-K
    ``values[t] = Σ_k a[i_t·b + r, k] · b'[k, j_t·b + c]`` for the kept blocks only, with
    the batch folded into the contraction (``K = T·R``) when the layout allows
    (``a (T, M, R)`` and ``b' (T, R, N)`` whose batch and contraction dims merge).  The
    kept blocks of one block column ``j`` (in BSC order) are stacked along M: a
    program's ``BLOCK_M`` rows are ``BLOCK_M/b`` consecutive blocks of that column (or a
    ``BLOCK_M``-row slice of one block when ``b ≥ BLOCK_M``), gathered once before the
    loop, so 16- and 32-blocks get 64/128-row ``wgmma`` tiles too.  The grid is
    ``(block columns · ⌈M/BLOCK_M⌉ · b/BLOCK_N, splits)``; programs past a column's
    last block do nothing.  When the kept blocks make fewer tiles than a few waves
    of the GPU's SMs the contraction is split into ``splits`` contiguous ranges
    (split-K, :func:`sdd_splits`); each split writes fp32 partial sums to a workspace
    ``(splits, nnz, b, b)`` which ``_sum_splits_kernel`` then adds in split order --
    no atomics, so the result is the same bits on every run.

Every kernel accumulates in fp32 (``tl.dot`` on tensor cores for fp16/bf16; fp32
inputs use IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32``; see
``_precision`` for the interpreter's bf16) and takes arbitrary strides, so
transposed operands need no copy.  Element offsets are computed in int64.

Autotuning: configurations are tuned per block size and dtype on a *bucketed* key --
the next power of two of the folded token count (dds/dsd) or of the contraction
length (sdd), the layout class (which operand dims are unit-stride, whether blocks
go through the BSC permutation, batched or folded) and the split count -- so a new
batch size or token count in the same power-of-two bucket reuses the tuned config
instead of re-tuning.  :func:`warm_up` tunes and compiles the kernels of one
block-sparse Linear layer ahead of time (e.g. before timing or training).  Compiled
kernels -- and the autotuner's choices, where the installed Triton caches them on disk
(``cache_results``) -- are stored under ``TRITON_CACHE_DIR`` (default
``~/.triton/cache``): point it at a persistent directory to skip compilation and
tuning in later processes.  Under the Triton interpreter one
small fixed configuration is used (``BLOCK_M`` 32 > 16, so tokens-on-M, the
stacked sdd rows, sub-block k-steps for ``b = 32`` and the index prefetch all run),
and split-K is chosen as for a GPU with :data:`INTERPRETER_SMS` SMs; :data:`SPLIT_K`
forces a split count.  A batch larger than the grid's axis-1 limit
(:data:`MAX_GRID_DIM`) is launched in chunks.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "dds", "dsd", "sdd", "tokens_matmul", "sdd_splits", "warm_up",
    "SPLIT_K", "MAX_SPLITS", "INTERPRETER_SMS", "MAX_GRID_DIM",
]

MAX_GRID_DIM = 65535  # CUDA's limit on grid axes 1 and 2 (the dds batch axis)

SPLIT_K: Optional[int] = None
"""Force the sdd split count (``None``: chosen by :func:`sdd_splits`); for tests and tuning."""

MAX_SPLITS = 16  # at most this many contraction splits in sdd
SPLIT_BELOW_WAVES = 2  # split sdd when its tiles fill fewer than this many waves of SMs ...
SPLIT_TARGET_WAVES = 3  # ... into enough splits for about this many waves
MIN_SPLIT_K = 512  # contraction elements per split, at least (GPU)
INTERPRETER_SMS = 4  # the SM count split-K assumes under the Triton interpreter

_NOMINAL_TILE_ROWS = 128  # sdd's split choice counts tiles of 128 stacked rows × min(b, 128) columns


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _precision(dtype: torch.dtype) -> dict:
    """``PRECISION`` of fp32 dots and ``UPCAST``: the interpreter's bf16 ``tl.dot`` returns
    garbage (Triton 3.8), so there bf16 tiles are widened to fp32 first (exact)."""
    upcast = dtype == torch.bfloat16 and _interpreting()
    ieee = upcast or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return dict(PRECISION="ieee" if ieee else "tf32", UPCAST=upcast)


# ----------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------
# The autotune-key arguments are not specialised on their values (no recompiles per value).
@triton.jit(do_not_specialize=["tune_m", "tune_layout"])
def _dds_kernel(
    a_ptr, values_ptr, offsets_ptr, indices_ptr, perm_ptr, out_ptr,
    M, num_col_blocks,
    sab, sam, saq,
    s_vk, s_vn,
    sob, som, son,
    tune_m, tune_layout,
    HAS_PERM: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``out[t, m, j·b + n] = Σ_{e ∈ col(j)} Σ_kk a[t, m, indices[e]·b + kk] · V[blk(e)][n·s_vn + kk·s_vk]``.

    ``tune_m`` and ``tune_layout`` only key the autotuner (module docstring).
    """
    pid = tl.program_id(0)
    bt = tl.program_id(1).to(tl.int64)
    SUB_N: tl.constexpr = BS // BLOCK_N
    KSUB: tl.constexpr = BS // BLOCK_K
    num_n = num_col_blocks * SUB_N
    pid_m = pid // num_n  # the weight's column tile runs fastest: neighbours share the a tile
    pid_n = pid % num_n
    j = pid_n // SUB_N
    n0 = (pid_n % SUB_N) * BLOCK_N
    start = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    a_rows = a_ptr + bt * sab + offs_m.to(tl.int64)[:, None] * sam
    v_tile = values_ptr + offs_n[None, :] * s_vn + offs_k[:, None] * s_vk
    # The current entry (its column offset in a, its packed block's offset) and the
    # next one, prefetched: a step's tile addresses come from loop-carried values only.
    e = start
    a_col = tl.load(indices_ptr + e, mask=e < end, other=0).to(tl.int64) * BS
    nxt_col = tl.load(indices_ptr + e + 1, mask=e + 1 < end, other=0).to(tl.int64)
    if HAS_PERM:
        v_blk = tl.load(perm_ptr + e, mask=e < end, other=0).to(tl.int64) * (BS * BS)
        nxt_blk = tl.load(perm_ptr + e + 1, mask=e + 1 < end, other=0).to(tl.int64)
    else:
        v_blk = e.to(tl.int64) * (BS * BS)
        nxt_blk = (e + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, (end - start) * KSUB):
        if KSUB == 1:
            kin = 0
        else:
            kin = (it % KSUB) * BLOCK_K
        a = tl.load(a_rows + (a_col + kin + offs_k)[None, :] * saq, mask=m_ok[:, None], other=0.0)
        b = tl.load(v_tile + (v_blk + kin * s_vk))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # After the entry's last k-step move to the prefetched entry, then prefetch the next.
        if KSUB == 1:
            a_col = nxt_col * BS
            v_blk = nxt_blk * (BS * BS)
            e = e + 1
        else:
            last = (e * 0 + it) % KSUB == KSUB - 1
            a_col = tl.where(last, nxt_col * BS, a_col)
            v_blk = tl.where(last, nxt_blk * (BS * BS), v_blk)
            e = tl.where(last, e + 1, e)
        nxt_col = tl.load(indices_ptr + e + 1, mask=e + 1 < end, other=0).to(tl.int64)
        if HAS_PERM:
            nxt_blk = tl.load(perm_ptr + e + 1, mask=e + 1 < end, other=0).to(tl.int64)
        else:
            nxt_blk = (e + 1).to(tl.int64)
    cols = (j * BS + offs_n).to(tl.int64)
    dst = out_ptr + bt * sob + offs_m.to(tl.int64)[:, None] * som + cols[None, :] * son
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


@triton.jit(do_not_specialize=["nnz", "tune_k", "tune_layout"])
def _sdd_kernel(
    a_ptr, b_ptr, out_ptr, col_offsets_ptr, bsc_rows_ptr, bsc_perm_ptr,
    BT, R, nnz, num_block_rows,
    sab, sam, sar,
    sbb, sbr, sbn,
    tune_k, tune_layout,
    SPLIT: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """``out[s, perm[e], r, c] = Σ_{k ∈ split s} a[k // R, rows[e]·b + r, k % R] · b'[k // R, k % R, j·b + c]``
    over ``k ∈ [0, BT·R)`` for the BSC entries ``e`` of block column ``j``.

    ``SPLIT``: ``out`` is the fp32 workspace ``(splits, nnz, b, b)`` (one slice per
    ``program_id(1)``); else it is ``values (nnz, b, b)`` and there is one split.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    SUB_N: tl.constexpr = BS // BLOCK_N
    m_tiles = tl.cdiv(num_block_rows * BS, BLOCK_M)
    per_col = m_tiles * SUB_N
    j = pid // per_col
    n0 = (pid % per_col) // m_tiles * BLOCK_N
    mt = pid % m_tiles  # the stacked row tile runs fastest: neighbours share b's column tile
    start = tl.load(col_offsets_ptr + j)
    count = tl.load(col_offsets_ptr + j + 1) - start

    # Stacked rows: row m of the tile is row m % b of the column's (m // b)-th kept block.
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = offs_m // BS
    r_in = offs_m % BS
    valid = slot < count
    e = start + slot
    blk_row = tl.load(bsc_rows_ptr + e, mask=valid, other=0).to(tl.int64)
    blk = tl.load(bsc_perm_ptr + e, mask=valid, other=0).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + (blk_row * BS + r_in)[:, None] * sam
    b_cols = b_ptr + (j * BS + offs_n).to(tl.int64)[None, :] * sbn

    num_k = tl.cdiv(R, BLOCK_K)
    chunks = BT * num_k  # BLOCK_K-steps of the contraction, split into contiguous ranges
    per_split = tl.cdiv(chunks, splits)
    c_lo = split * per_split
    c_hi = tl.minimum(c_lo + per_split, chunks)
    c_hi = tl.where(mt * BLOCK_M < count * BS, c_hi, c_lo)  # past the column's last block: no work
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        bt = c // num_k
        k = (c - bt * num_k) * BLOCK_K + offs_k
        k_ok = k < R
        k64 = k.to(tl.int64)
        bt64 = bt.to(tl.int64)
        a = tl.load(a_rows + (bt64 * sab + k64[None, :] * sar), mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + (bt64 * sbb + k64[:, None] * sbr), mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    dst = blk[:, None] * (BS * BS) + r_in[:, None] * BS + offs_n[None, :]
    if SPLIT:
        ws = out_ptr + split.to(tl.int64) * nnz * (BS * BS)
        tl.store(ws + dst, acc, mask=valid[:, None])
    else:
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _sum_splits_kernel(ws_ptr, out_ptr, n, splits, BLOCK: tl.constexpr):
    """``out[i] = Σ_{s = 0, 1, …, splits-1} ws[s, i]`` in that order (fp32), cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    src = ws_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, splits):
        acc += tl.load(src, mask=ok, other=0.0)
        src += n
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------
_SMEM_BUDGET = 160 * 1024  # pipeline buffers, at most (sm_80 has 163 KB per block, sm_90 227 KB)


def _elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _stage_warp_options(bm: int, bn: int, bk: int, size: int) -> list[tuple[int, int]]:
    """``(num_stages, num_warps)`` pairs for a ``bm × bn`` tile with ``bk``-deep k-steps of
    ``size``-byte elements, within :data:`_SMEM_BUDGET`.

    16-bit: 3-4 stages (6 for stages of at most 8 KB) with one warpgroup, and 4 stages
    with two for tiles of at least 128 × 64.  fp32 (its FMA dot holds operand tiles in
    registers): 3-4 stages, one warpgroup up to 64 × 64 and two for 128 × 64.
    """
    stage_bytes = (bm + bn) * bk * size
    if size == 4:
        options = [(3, 4), (4, 4)] if bm * bn <= 64 * 64 else [(3, 8), (4, 8)]
    else:
        options = [(3, 4), (4, 4)] + ([(6, 4)] if stage_bytes <= 8 * 1024 else [])
        if bm * bn >= 128 * 64:
            options.append((4, 8))
    return [(s, w) for s, w in options if s * stage_bytes <= _SMEM_BUDGET]


def _n_tiles(bs: int) -> list[int]:
    """``BLOCK_N`` candidates: the block (at most 128) and half of it (at least 16)."""
    return sorted({min(bs, 128), max(16, min(bs, 128) // 2)}, reverse=True)


def _configs(tiles: "Sequence[tuple[int, int, int]]", size: int) -> list:
    """``triton.Config`` s for ``(BLOCK_M, BLOCK_N, BLOCK_K)`` tiles of ``size``-byte elements
    (fp32 tiles up to 64 × 64, or 128 × 64 on two warpgroups) × :func:`_stage_warp_options`."""
    out = []
    for bm, bn, bk in tiles:
        if size == 4 and bm * bn > 64 * 64 and bm * bn != 128 * 64:
            continue
        for stages, warps in _stage_warp_options(bm, bn, bk, size):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=stages, num_warps=warps))
    return out


def _dds_configs(bs: int, dtype: torch.dtype = torch.bfloat16) -> list:
    """Autotune configs of ``_dds_kernel`` for block size ``bs`` and operand ``dtype``.

    ``BLOCK_M`` 64/128 tokens (one or two 64-row ``wgmma`` warpgroups), ``BLOCK_N`` the
    block or half of it (:func:`_n_tiles`), ``BLOCK_K`` a divisor of the block (the
    block, or 32-64 for larger blocks; 16 for fp32), and ``num_stages`` buffers of
    ``(BLOCK_M + BLOCK_N) · BLOCK_K`` elements within the shared-memory budget of both
    sm_80 and sm_90 (:func:`_stage_warp_options`).
    """
    size = _elem_bytes(dtype)
    bks = (16,) if size == 4 else [bk for bk in (64, 32, 16) if bk <= bs and (bk == bs or bk >= 32)]
    return _configs([(bm, bn, bk) for bm in (64, 128) for bn in _n_tiles(bs) for bk in bks], size)


def _sdd_configs(bs: int, dtype: torch.dtype = torch.bfloat16) -> list:
    """Autotune configs of ``_sdd_kernel`` for block size ``bs`` and operand ``dtype``.

    ``BLOCK_M`` 64/128 stacked rows (``BLOCK_M/bs`` kept blocks of one block column, or a
    slice of one block), ``BLOCK_N`` the block or half of it, ``BLOCK_K`` 32-128 tokens
    (16 for fp32), within the same budget as :func:`_dds_configs`.
    """
    size = _elem_bytes(dtype)
    bks = (16,) if size == 4 else (32, 64, 128)
    return _configs([(bm, bn, bk) for bm in (64, 128) for bn in _n_tiles(bs) for bk in bks], size)


def _dtype_class(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose config list a dtype uses."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16  # fp16 and bf16 share configs


def _autotune(configs: list, key: list[str]):
    """``triton.autotune`` with the tuning results cached on disk where Triton supports it."""
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, **extra)


@functools.lru_cache(maxsize=None)
def _tuned_dds(bs: int, dtype_class: torch.dtype):
    return _autotune(_dds_configs(bs, dtype_class), ["tune_m", "tune_layout", "HAS_PERM"])(_dds_kernel)


@functools.lru_cache(maxsize=None)
def _tuned_sdd(bs: int, dtype_class: torch.dtype):
    return _autotune(_sdd_configs(bs, dtype_class), ["tune_k", "tune_layout", "SPLIT"])(_sdd_kernel)


_FIXED = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}  # the interpreter's one configuration
_SUM_BLOCK = 1024


def _bucket(n: int) -> int:
    """The autotune bucket of a size: the next power of two (at least 1)."""
    return triton.next_power_of_2(max(1, int(n)))


def _unit_bits(*strides: int) -> int:
    """Layout class for the autotune key: bit ``i`` set when ``strides[i]`` is 1."""
    return sum(1 << i for i, s in enumerate(strides) if s == 1)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """The device's SM count (:data:`INTERPRETER_SMS` under the interpreter or off CUDA)."""
    if device.type == "cuda" and not _interpreting():
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_SMS


# ----------------------------------------------------------------------------------
# dds / dsd: tokens on M
# ----------------------------------------------------------------------------------
def _merged_stride(size0: int, stride0: int, size1: int, stride1: int) -> Optional[int]:
    """The stride of dims ``(size0, size1)`` merged into one strided dim, or None if they don't merge."""
    if size1 == 1:
        return stride0
    if size0 == 1 or stride0 == size1 * stride1:
        return stride1
    return None


def _fold_rows(a: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a (T, M, Q)`` and ``out (T, M, N)`` as ``(1, T·M, ·)`` views when both batch and row
    dims merge (a contiguous ``(T, P, Q)`` input does); else unchanged."""
    T, M = a.shape[:2]
    if T == 1:
        return a, out
    sa = _merged_stride(T, a.stride(0), M, a.stride(1))
    so = _merged_stride(T, out.stride(0), M, out.stride(1))
    if sa is None or so is None:
        return a, out
    rows = T * M
    return (a.as_strided((1, rows, a.shape[2]), (rows * sa, sa, a.stride(2))),
            out.as_strided((1, rows, out.shape[2]), (rows * so, so, out.stride(2))))


def tokens_matmul(
    values: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    perm: Optional[torch.Tensor],
    transpose_blocks: bool,
    a: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """In place: ``out[t] = a[t] @ B`` with ``B``'s column lists given as the row lists of ``Bᵀ``.

    values (nnz, b, b) contiguous; offsets (N/b + 1,), indices/perm (nnz,) int32: entry ``e``
    of block column ``j`` holds ``Bᵀ``'s block ``(j, indices[e])`` in ``values[perm[e]]``
    (``values[e]`` without ``perm``), transposed when ``transpose_blocks``.  a (T, M, Q) and
    out (T, M, N) with any strides; the batch is folded into the rows when the strides
    allow.  Returns ``out``.
    """
    if out.numel() == 0:
        return out
    a_f, out_f = _fold_rows(a, out)
    T = out_f.shape[0]
    # A batch that does not fold runs on grid axis 1 (at most MAX_GRID_DIM programs):
    # a larger one is launched in chunks, on slices of a and out (views).
    for start in range(0, T, MAX_GRID_DIM):
        chunk = slice(start, min(T, start + MAX_GRID_DIM))
        _launch_dds(values, offsets, indices, perm, transpose_blocks, a_f[chunk], out_f[chunk])
    return out


def _dds_launch_args(values, offsets, indices, perm, transpose_blocks: bool, a: torch.Tensor, out: torch.Tensor):
    """``(args, constexprs)`` of one ``_dds_kernel`` launch (runtime arguments in order)."""
    bs = values.shape[-1]
    T, M, _ = out.shape
    num_col_blocks = offsets.numel() - 1
    s_vn, s_vk = (1, bs) if transpose_blocks else (bs, 1)
    layout = _unit_bits(a.stride(1), a.stride(2), s_vk, out.stride(2)) | (T > 1) << 4
    args = (
        a, values, offsets, indices, perm if perm is not None else indices, out,
        M, num_col_blocks,
        a.stride(0), a.stride(1), a.stride(2),
        s_vk, s_vn,
        out.stride(0), out.stride(1), out.stride(2),
        _bucket(T * M), layout,
    )
    return args, dict(HAS_PERM=perm is not None, BS=bs, **_precision(values.dtype))


def _launch_dds(values, offsets, indices, perm, transpose_blocks: bool, a: torch.Tensor, out: torch.Tensor) -> None:
    """One launch of ``_dds_kernel`` for ``out (T, M, N)`` with ``T <= MAX_GRID_DIM``."""
    bs = values.shape[-1]
    T, M, _ = out.shape
    num_col_blocks = offsets.numel() - 1
    args, consts = _dds_launch_args(values, offsets, indices, perm, transpose_blocks, a, out)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * num_col_blocks * (bs // meta["BLOCK_N"]), T)

    if _interpreting():
        _dds_kernel[grid(_FIXED)](*args, **consts, **_FIXED)
    else:
        _tuned_dds(bs, _dtype_class(values.dtype))[grid](*args, **consts)


def dds(a: torch.Tensor, values, offsets, indices, perm, transpose_blocks: bool, cols: int) -> torch.Tensor:
    """``a[t] @ B`` for ``a (T, P, Q)``, ``B (Q, cols)`` given by the row lists of ``Bᵀ`` -> ``(T, P, cols)``."""
    out = torch.empty((a.shape[0], a.shape[1], cols), dtype=a.dtype, device=a.device)
    return tokens_matmul(values, offsets, indices, perm, transpose_blocks, a, out)


def dsd(values, offsets, indices, perm, transpose_blocks: bool, b: torch.Tensor, rows: int) -> torch.Tensor:
    """``A @ b[t]`` for ``b (T, Q, N)`` and ``A (rows, Q)`` given by its row lists -> ``(T, rows, N)``.

    Computed as ``outᵀ[t] = b[t]ᵀ @ Aᵀ`` (tokens on M): the row lists of ``A`` are the
    column lists of ``Aᵀ``.
    """
    out = torch.empty((b.shape[0], rows, b.shape[2]), dtype=b.dtype, device=b.device)
    tokens_matmul(values, offsets, indices, perm, transpose_blocks, b.transpose(1, 2), out.transpose(1, 2))
    return out


# ----------------------------------------------------------------------------------
# sdd: folded contraction, split-K
# ----------------------------------------------------------------------------------
def _fold_contraction(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a (T, M, R)`` and ``b (T, R, N)`` as ``(1, M, T·R)`` and ``(1, T·R, N)`` views when both
    batch and contraction dims merge; else unchanged."""
    T, _, R = a.shape
    if T == 1:
        return a, b
    sa = _merged_stride(T, a.stride(0), R, a.stride(2))
    sb = _merged_stride(T, b.stride(0), R, b.stride(1))
    if sa is None or sb is None:
        return a, b
    k = T * R
    return (a.as_strided((1, a.shape[1], k), (0, a.stride(1), sa)),
            b.as_strided((1, k, b.shape[2]), (0, sb, b.stride(2))))


def sdd_splits(nnz: int, block_size: int, k: int, device: torch.device) -> int:
    """The number of contraction splits sdd uses (:data:`SPLIT_K` when set).

    One split when the kept blocks make at least ``SPLIT_BELOW_WAVES`` waves of nominal
    tiles (128 stacked rows × ``min(b, 128)`` columns) on the device's SMs; else enough
    splits for about ``SPLIT_TARGET_WAVES`` waves, each at least ``MIN_SPLIT_K``
    contraction elements long (one interpreter k-step under the interpreter) and at most
    :data:`MAX_SPLITS`.  It depends on the shapes and the device only, so every run
    of a problem reduces in the same order.
    """
    if SPLIT_K is not None:
        return max(1, int(SPLIT_K))
    sms = _num_sms(device)
    tiles = triton.cdiv(nnz * block_size * block_size, _NOMINAL_TILE_ROWS * min(block_size, 128))
    if tiles >= SPLIT_BELOW_WAVES * sms:
        return 1
    min_k = _FIXED["BLOCK_K"] if _interpreting() else MIN_SPLIT_K
    return max(1, min(triton.cdiv(SPLIT_TARGET_WAVES * sms, tiles), triton.cdiv(k, min_k), MAX_SPLITS))


def _sdd_launch_args(a: torch.Tensor, b: torch.Tensor, col_offsets, bsc_rows, bsc_perm, block_size: int,
                     out: torch.Tensor, split: bool):
    """``(args, constexprs)`` of one ``_sdd_kernel`` launch on folded ``a``, ``b``."""
    BT, _, R = a.shape
    nnz = bsc_perm.numel()
    layout = _unit_bits(a.stride(1), a.stride(2), b.stride(1), b.stride(2)) | (BT > 1) << 4
    args = (
        a, b, out, col_offsets, bsc_rows, bsc_perm,
        BT, R, nnz, a.shape[1] // block_size,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        _bucket(BT * R), layout,
    )
    return args, dict(SPLIT=split, BS=block_size, **_precision(a.dtype))


def sdd(
    a: torch.Tensor,
    b: torch.Tensor,
    col_offsets: torch.Tensor,
    bsc_rows: torch.Tensor,
    bsc_perm: torch.Tensor,
    block_size: int,
    *,
    splits: Optional[int] = None,
) -> torch.Tensor:
    """The kept blocks of ``Σ_t a[t] @ b[t]``: a (T, M, R), b (T, R, N) -> (nnz, b, b).

    The layout enters as its BSC index (``col_offsets (N/b + 1,)``, ``bsc_rows``,
    ``bsc_perm (nnz,)`` int32; ``values[bsc_perm[e]]`` is block ``(bsc_rows[e], j)`` for
    the entries ``e`` of block column ``j``).  ``splits``: the contraction splits
    (default :func:`sdd_splits`); with more than one, fp32 partial sums are added in a
    fixed order.
    """
    bs = block_size
    nnz = bsc_perm.numel()
    out = torch.empty((nnz, bs, bs), dtype=a.dtype, device=a.device)
    if nnz == 0:
        return out
    BT, M, R = a.shape
    if BT * R == 0:
        return out.zero_()
    a, b = _fold_contraction(a, b)
    if splits is None:
        splits = sdd_splits(nnz, bs, BT * R, a.device)
    splits = max(1, min(int(splits), MAX_GRID_DIM))
    target = torch.empty((splits, nnz, bs, bs), dtype=torch.float32, device=a.device) if splits > 1 else out
    args, consts = _sdd_launch_args(a, b, col_offsets, bsc_rows, bsc_perm, bs, target, splits > 1)
    num_block_cols = col_offsets.numel() - 1

    def grid(meta):
        return (num_block_cols * triton.cdiv(M, meta["BLOCK_M"]) * (bs // meta["BLOCK_N"]), splits)

    if _interpreting():
        _sdd_kernel[grid(_FIXED)](*args, **consts, **_FIXED)
    else:
        _tuned_sdd(bs, _dtype_class(a.dtype))[grid](*args, **consts)
    if splits > 1:
        n = out.numel()
        _sum_splits_kernel[(triton.cdiv(n, _SUM_BLOCK),)](target, out, n, splits, BLOCK=_SUM_BLOCK)
    return out


# ----------------------------------------------------------------------------------
# Warm-up
# ----------------------------------------------------------------------------------
def _lists_from_mask(mask: torch.Tensor) -> dict:
    """BSR and BSC index lists (int32) of a block mask ``(mb, kb)``, BSR-ordered values."""
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: BSR order
    mb, kb = mask.shape
    i32 = dict(dtype=torch.int32, device=mask.device)
    row_offsets = torch.zeros(mb + 1, **i32)
    row_offsets[1:] = torch.bincount(rows, minlength=mb).cumsum(0)
    order = torch.argsort(cols * mb + rows)  # BSC order
    col_offsets = torch.zeros(kb + 1, **i32)
    col_offsets[1:] = torch.bincount(cols, minlength=kb).cumsum(0)
    return dict(row_offsets=row_offsets, col_indices=cols.to(torch.int32), col_offsets=col_offsets,
                bsc_rows=rows[order].to(torch.int32), bsc_perm=order.to(torch.int32))


def warm_up(
    in_features: int,
    out_features: int,
    block_size: int,
    tokens: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    density: float = 0.5,
    device: "torch.device | str" = "cuda",
    backward: bool = True,
) -> None:
    """Compile and autotune the kernels of one block-sparse Linear ``y = x @ Wᵀ``.

    Runs, on random data with ``W (out_features, in_features)`` at block size
    ``block_size`` and about ``density`` of its blocks kept, and ``x (tokens, ·)``
    (``tokens`` = batch · tokens per image, as the kernels fold them): the forward
    ``x @ Wᵀ`` (dds) and, with ``backward``, the input gradient ``dy @ W`` (dds through
    the BSC permutation) and the weight gradient ``Σ dyᵀ x`` on W's blocks (sdd).  The
    tuned configs are keyed by the power-of-two bucket of ``tokens`` (module docstring),
    so one warm-up per layer shape and bucket serves every batch size in it; the
    compiled kernels (and tuning results) land in ``TRITON_CACHE_DIR``.
    """
    device = torch.device(device)
    bs = block_size
    if in_features % bs or out_features % bs:
        raise ValueError(f"in_features={in_features} and out_features={out_features} must be multiples of {bs}")
    gen = torch.Generator(device="cpu").manual_seed(0)
    mask = torch.rand(out_features // bs, in_features // bs, generator=gen) < density
    mask[0, 0] = True
    lists = {k: v.to(device) for k, v in _lists_from_mask(mask).items()}
    nnz = lists["col_indices"].numel()
    values = torch.randn(nnz, bs, bs, dtype=dtype, device=device)
    x = torch.randn(1, tokens, in_features, dtype=dtype, device=device)
    dds(x, values, lists["row_offsets"], lists["col_indices"], None, False, out_features)  # x @ Wᵀ
    if backward:
        dy = torch.randn(1, tokens, out_features, dtype=dtype, device=device)
        dds(dy, values, lists["col_offsets"], lists["bsc_rows"], lists["bsc_perm"], True, in_features)  # dy @ W
        sdd(dy.transpose(1, 2), x, lists["col_offsets"], lists["bsc_rows"], lists["bsc_perm"], bs)  # Σ dyᵀ x
    if device.type == "cuda":
        torch.cuda.synchronize(device)
