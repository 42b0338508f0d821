"""Triton kernels for DynamicViT's masked-softmax attention, flash-style (forward + backward).

Implements Rao et al., DynamicViT (NeurIPS 2021), Eq. 11 with the public code's eps
terms, fused in the manner of FlashAttention-2 (Dao 2023, Alg. 1 and 2): with
``P = Q Kᵀ · scale``, ``m_i = max_j P_ij`` over all N keys, ``G_ij = 1`` if ``i = j``
else ``keep_j`` and ``e_ij = exp(P_ij − m_i)``,

    out_i = (Σ_j e_ij G_ij v_j + eps/N · Σ_j v_j) / S_i,   S_i = Σ_j e_ij G_ij + eps.

Range and precision.  The weights fed to the low-precision P·V product are taken
relative to the *weighted* running max ``m^w_i = max_j (P_ij + log G_ij)`` (finite: the
diagonal has ``G = 1``), not to ``m_i``: ``w_ij = exp(P_ij + log G_ij − m^w_i) ∈ [0, 1]``
with a largest weight of 1, so kept keys far below a dropped maximum neither leave
float16's range nor vanish.  ``m_i`` (and its first argmax ``j*_i``) is tracked beside
it and enters once, in float32 and in the log domain, through
``r_i = eps·exp(m_i − m^w_i)``: with ``l_i = Σ_j w_ij``,

    λ_i = log(l_i + r_i),   ρ_i = eps / S_i = r_i / (l_i + r_i) = sigmoid(log r_i − log l_i),
    Ã_ij = exp((P_ij − m^w_i) + log G_ij − λ_i) + ρ_i / N,
    out_i = exp(−λ_i) Σ_j w_ij v_j + (ρ_i / N) Σ_j v_j.

Everything is relative to the row's largest weight, so no precision is lost to the
size of the scores.  No (N, N) tensor reaches memory; the forward stores ``m^w_i``,
``λ_i``, ``ρ_i`` and ``j*_i`` per row (and, for float16/bfloat16 inputs that need a
gradient, the float32 output).

Backward: the exact gradient of the formula, through ``m_i`` as the public code's
autograd takes it.  With ``e_ij / S_i = exp(P_ij − m^w_i − λ_i)``, ``a_ij = G_ij e_ij / S_i``,
``Δ_i = dO_i · O_i`` (from the float32 output: the rounded one would lose the
cancellation ``dÃ_ij − Δ_i`` of a row that attends to one key), ``dÃ_ij = dO_i · v_j``
and ``dm_i = ρ_i (dO_i · V̄ / N − Δ_i)`` (``V̄ = Σ_j v_j``; ``∂out_i/∂m_i = ρ_i (V̄/N − out_i)``):

    dP_ij = a_ij (dÃ_ij − Δ_i) + [j = j*_i] dm_i,

* ``dV_j = Σ_i Ã_ij dO_i``, ``dK_j = scale Σ_i dP_ij q_i``,
  ``dkeep_j = Σ_{i ≠ j} (e_ij / S_i) (dÃ_ij − Δ_i)`` (per head): one program per key block;
* ``dQ_i = scale Σ_j dP_ij k_j``: one program per query block;
* ``Δ_i`` and ``dm_i``: a pre-pass, one program per query block.

The max correction is one ``where`` on the argmax column of each row, deterministic,
no atomics.  Cost of this form against a plain online softmax: the forward keeps two
more per-row registers (``m_i``, ``j*_i``) and does one more row reduction per tile
(the all-key max, with its first index when eps > 0); per score it adds one add
(``(P − m^w) + log G``), and ``log keep`` is taken once per key per tile.  ``V̄`` and
the eps terms' share of dV, ``Σ_i (ρ_i / N) dO_i``, are one torch reduction each,
outside the kernels.  The backward adds, per score, a compare and select for the
``G = 0`` guard and one for the argmax column (its padding masks are gone), and
reads three more values per row (``ρ``, ``j*``, ``dm``).  The float32 output costs 4
bytes per output element of memory held for the backward, only when a gradient is
needed and the inputs are float16/bfloat16.  Registers (ptxas for sm_90a, bf16,
D = 64, keep and eps > 0, before → after): forward 128×64 tiles, 8 warps 230 → 236,
no spills; 64×64, 4 warps 8 → 0 bytes spilled; 128×64, 4 warps 124 → 436 bytes
spilled (the autotuner has the others); dK/dV 64×64, 8 warps 226 registers → 255 and
24 bytes spilled, 4 warps 36 → 76; dQ 64×64, 8 warps 198 → 225, 4 warps 16 → 12.
Speed is not measured here (the interpreter says nothing about it).

A negative, NaN or infinite ``keep_j`` is turned into a NaN gate for every query
(the diagonal included), so the whole batch element comes out NaN, as in the
reference.  In-slice offsets are int64 (``N × row stride`` may exceed 2³¹ in one
(b, h) slice).  Head dims are padded to a power of two (``BLOCK_D``) with masked
loads, any N works (the last tile is masked), inputs may have any strides.  Products
accumulate in float32; fp32 inputs use IEEE (not TF32) products.  Under
``TRITON_INTERPRET=1`` fixed small tiles are used; on a GPU the tile sizes are autotuned.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["masked_attention_fwd", "masked_attention_bwd"]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation; ``UPCAST`` multiplies in float32 (interpreter bf16)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _rnd(x, UPCAST: tl.constexpr):
    """``x`` rounded to the nearest bf16 value when ``UPCAST`` (the interpreter's casts truncate)."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _off(idx, stride):
    """Element offsets ``idx · stride`` in int64: one (b, h) slice may span more than 2³¹ elements."""
    return idx.to(tl.int64) * stride


@triton.jit
def _gate(KEEP, b, skpb, skpn, offs_n, n_ok):
    """``(G_ij for j ≠ i, G_jj)`` per key of the tile: ``keep_j`` and 1, both NaN when
    ``keep_j`` is negative or not finite (padding keys: 0 and 1)."""
    kp = tl.load(KEEP + b * skpb + _off(offs_n, skpn), mask=n_ok, other=0.0).to(tl.float32)
    ok = (kp >= 0) & (kp < float("inf"))
    return tl.where(ok, kp, float("nan")), tl.where(ok, 1.0, float("nan"))


@triton.jit
def _log(g):
    """``log g`` per key, −inf for a dropped key (``g = 0``) without evaluating log 0."""
    pos = g > 0
    return tl.where(pos, tl.log(tl.where(pos, g, 1.0)), tl.where(g == 0, float("-inf"), float("nan")))


@triton.jit
def _masked_attention_fwd_kernel(
    Q, K, V, KEEP, VBAR, O, O32, MW, LAM, RHO, JSTAR,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    skpb, skpn,
    H, N, D,
    scale, log_eps, inv_n,
    HAS_KEEP: tl.constexpr, HAS_EPS: tl.constexpr, STORE_O32: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + _off(offs_m[:, None], sqn) + _off(offs_d[None, :], sqd),
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # max_j P_ij (all keys)
    j_star = tl.zeros([BLOCK_M], dtype=tl.int32)                  # its first index
    m_w = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)    # max_j (P_ij + log G_ij)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = tl.load(k_base + _off(offs_n[None, :], skn) + _off(offs_d[:, None], skd),
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + _off(offs_n[:, None], svn) + _off(offs_d[None, :], svd),
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if HAS_KEEP:
            if HAS_EPS:
                tile_max, first = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
                j_star = tl.where(tile_max > m_all, start_n + first, j_star)  # strict: earlier tiles win ties
            else:
                tile_max = tl.max(s, 1)
            m_all = tl.maximum(m_all, tile_max)
            g_off, g_diag = _gate(KEEP, b, skpb, skpn, offs_n, n_ok)
            log_g = tl.where(offs_m[:, None] == offs_n[None, :], _log(g_diag)[None, :], _log(g_off)[None, :])
            m_new = tl.maximum(m_w, tl.max(s + log_g, 1))
        else:
            log_g = 0.0
            m_new = tl.maximum(m_w, tl.max(s, 1))
        # a row with no weighted key yet (all dropped so far): keep exp() away from inf − inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_w - m_use)
        # (s − m) + log G, not (s + log G) − m: the shift's own rounding cancels, the scores' would not
        w = tl.exp((s - m_use[:, None]) + log_g)
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + _dot(_rnd(w, UPCAST).to(v.dtype), v, PRECISION, UPCAST)
        m_w = m_new
    if not HAS_KEEP:
        m_all = m_w
    # padding rows (never stored) may have seen no weighted key: keep them finite
    m_w = tl.where(m_ok, m_w, 0.0)
    l_i = tl.where(m_ok, l_i, 1.0)
    log_l = tl.log(l_i)
    if HAS_EPS:
        # r = eps·exp(m − m^w) in the log domain (it may exceed float32); λ = log(l + r),
        # ρ = r / (l + r) = sigmoid(log r − log l), free of cancellation either way
        log_r = log_eps + (m_all - m_w)
        hi = tl.maximum(log_l, log_r)
        lam = hi + tl.log(1.0 + tl.exp(tl.minimum(log_l, log_r) - hi))
        rho = 1.0 / (1.0 + tl.exp(log_l - log_r))
    else:
        lam = log_l
        rho = tl.zeros([BLOCK_M], dtype=tl.float32)
    out = acc * tl.exp(-lam)[:, None]
    if HAS_EPS:
        vbar = tl.load(VBAR + bh.to(tl.int64) * D + offs_d, mask=d_ok, other=0.0)  # Σ_j v_j, float32
        out += (rho * inv_n)[:, None] * vbar[None, :]
    row = bh.to(tl.int64) * N + offs_m
    # O and O32 are contiguous (B, H, N, D), one (b, h) slice < 2³¹ elements (checked by the
    # op): an int64 slice base plus int32 offsets in it, one offset tensor for both
    o_off = bh.to(tl.int64) * N * D + (offs_m[:, None] * D + offs_d[None, :])
    o_mask = m_ok[:, None] & d_ok[None, :]
    if STORE_O32:
        tl.store(O32 + o_off, out, mask=o_mask)
    tl.store(O + o_off, _rnd(out, UPCAST).to(O.dtype.element_ty), mask=o_mask)
    tl.store(MW + row, m_w, mask=m_ok)
    tl.store(LAM + row, lam, mask=m_ok)
    tl.store(RHO + row, rho, mask=m_ok)
    if not HAS_EPS:
        j_star = tl.full([BLOCK_M], -1, dtype=tl.int32)
    tl.store(JSTAR + row, j_star, mask=m_ok)


@triton.jit
def _masked_attention_bwd_delta_kernel(
    O, DO, VBAR, RHO, DELTA, DM,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    H, N, D,
    inv_n,
    HAS_EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Δ_i = dO_i · O_i and dm_i = ρ_i (dO_i · V̄ / N − Δ_i) in float32, BLOCK_M rows per program.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    mask = m_ok[:, None] & d_ok[None, :]
    o = tl.load(O + b * sob + h * soh + _off(offs_m[:, None], son) + _off(offs_d[None, :], sod), mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + _off(offs_m[:, None], sdn) + _off(offs_d[None, :], sdd),
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o.to(tl.float32) * do, 1)
    row = bh.to(tl.int64) * N + offs_m
    tl.store(DELTA + row, delta, mask=m_ok)
    if HAS_EPS:
        vbar = tl.load(VBAR + bh.to(tl.int64) * D + offs_d, mask=d_ok, other=0.0)
        rho = tl.load(RHO + row, mask=m_ok, other=0.0)
        tl.store(DM + row, rho * (tl.sum(do * vbar[None, :], 1) * inv_n - delta), mask=m_ok)


@triton.jit
def _masked_attention_bwd_dkdv_kernel(
    Q, K, V, KEEP, DO, MW, LAM, DVBAR, JSTAR, DELTA, DM, DK, DV, DKEEP,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    skpb, skpn,
    H, N, D,
    scale,
    HAS_KEEP: tl.constexpr, HAS_EPS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + _off(offs_n[:, None], skn) + _off(offs_d[None, :], skd),
                mask=nd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + _off(offs_n[:, None], svn) + _off(offs_d[None, :], svd),
                mask=nd_mask, other=0.0)
    if HAS_KEEP:
        g_off, g_diag = _gate(KEEP, b, skpb, skpn, offs_n, n_ok)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    row_base = bh.to(tl.int64) * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dkeep = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        md_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + _off(offs_m[:, None], sqn) + _off(offs_d[None, :], sqd), mask=md_mask, other=0.0)
        do = tl.load(do_base + _off(offs_m[:, None], sdn) + _off(offs_d[None, :], sdd), mask=md_mask, other=0.0)
        mw = tl.load(MW + row_base + offs_m, mask=m_ok, other=0.0)
        lam = tl.load(LAM + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        diag = offs_m[:, None] == offs_n[None, :]
        p = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        e = tl.exp((p - mw[:, None]) - lam[:, None])  # e_ij / S_i, relative to the row's largest weight
        # No padding masks here: a padding row has dO = 0, so t = 0 and it adds nothing, and
        # a padding key only reaches its own (never stored) dK, dV and dkeep.
        if HAS_KEEP:
            g = tl.where(diag, g_diag[None, :], g_off[None, :])
            # G = 0 gives 0 even where e overflowed (a dropped key far above the kept ones, eps = 0)
            a = tl.where(g != 0, e * g, 0.0)
        else:
            a = e
        # the eps part of Ã, ρ_i / N, is the same for every key: its dV share is added at the end
        dv += _dot(tl.trans(_rnd(a, UPCAST)).to(do.dtype), do, PRECISION, UPCAST)
        da = _dot(do, tl.trans(v), PRECISION, UPCAST)
        t = da - delta[:, None]
        dp = a * t
        if HAS_EPS:
            jstar = tl.load(JSTAR + row_base + offs_m, mask=m_ok, other=-1)
            dm = tl.load(DM + row_base + offs_m, mask=m_ok, other=0.0)
            dp += tl.where(offs_n[None, :] == jstar[:, None], dm[:, None], 0.0)
        dk += _dot(tl.trans(_rnd(dp, UPCAST)).to(q.dtype), q, PRECISION, UPCAST)
        if HAS_KEEP:
            dkeep += tl.sum(tl.where(diag, 0.0, e * t), 0)
    dk = dk * scale
    if HAS_EPS:
        dv += tl.load(DVBAR + bh.to(tl.int64) * D + offs_d, mask=d_ok, other=0.0)[None, :]
    out_off = b * sdb + h * sdh + _off(offs_n[:, None], sdn) + _off(offs_d[None, :], sdd)
    tl.store(DK + out_off, _rnd(dk, UPCAST).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_off, _rnd(dv, UPCAST).to(DV.dtype.element_ty), mask=nd_mask)
    if HAS_KEEP:
        tl.store(DKEEP + row_base + offs_n, dkeep, mask=n_ok)


@triton.jit
def _masked_attention_bwd_dq_kernel(
    Q, K, V, KEEP, DO, MW, LAM, JSTAR, DELTA, DM, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    skpb, skpn,
    H, N, D,
    scale,
    HAS_KEEP: tl.constexpr, HAS_EPS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + _off(offs_m[:, None], sqn) + _off(offs_d[None, :], sqd),
                mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + _off(offs_m[:, None], sdn) + _off(offs_d[None, :], sdd),
                 mask=md_mask, other=0.0)
    row_base = bh.to(tl.int64) * N
    mw = tl.load(MW + row_base + offs_m, mask=m_ok, other=0.0)
    lam = tl.load(LAM + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    if HAS_EPS:
        jstar = tl.load(JSTAR + row_base + offs_m, mask=m_ok, other=-1)
        dm = tl.load(DM + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + _off(offs_n[:, None], skn) + _off(offs_d[None, :], skd), mask=nd_mask, other=0.0)
        v = tl.load(v_base + _off(offs_n[:, None], svn) + _off(offs_d[None, :], svd), mask=nd_mask, other=0.0)
        p = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        e = tl.exp((p - mw[:, None]) - lam[:, None])
        # padding rows are never stored; a padding key must add nothing (its k is 0, e may be inf)
        if HAS_KEEP:
            g_off, g_diag = _gate(KEEP, b, skpb, skpn, offs_n, n_ok)  # G = 0 on padding keys
            g = tl.where(offs_m[:, None] == offs_n[None, :], g_diag[None, :], g_off[None, :])
            a = tl.where(g != 0, e * g, 0.0)
        else:
            a = tl.where(n_ok[None, :], e, 0.0)
        da = _dot(do, tl.trans(v), PRECISION, UPCAST)
        dp = a * (da - delta[:, None])
        if HAS_EPS:
            dp += tl.where(offs_n[None, :] == jstar[:, None], dm[:, None], 0.0)
        dq += _dot(_rnd(dp, UPCAST).to(k.dtype), k, PRECISION, UPCAST)
    dq = dq * scale
    tl.store(DQ + b * sdb + h * sdh + _off(offs_m[:, None], sdn) + _off(offs_d[None, :], sdd),
             _rnd(dq, UPCAST).to(DQ.dtype.element_ty), mask=md_mask)


# ----------------------------------------------------------------------------------
# Launch configuration: fixed small tiles in the interpreter, autotuned on a GPU.
# ----------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpret_tiles(n: int) -> dict:
    """Small tiles (many of them, exercising the edges) for short sequences; larger ones keep
    the interpreter's time reasonable at ViT lengths."""
    tile = 16 if n <= 64 else 64
    return dict(BLOCK_M=tile, BLOCK_N=tile)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): a short list, so that the first call at a
# new N tunes in seconds; tiles too large for shared memory are skipped by the autotuner.
_FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 32, 4, 2)]
_BWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2)]


def _configs(name: str) -> list:
    table = _FWD_CONFIGS if name == "fwd" else _BWD_CONFIGS
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in table
    ]


_TUNED: dict = {}


def _kernel(name: str, fn):
    """The autotuned wrapper of ``fn`` (built once, only when kernels really compile)."""
    if name not in _TUNED:
        key = ["N", "BLOCK_D", "HAS_KEEP", "HAS_EPS", "PRECISION"]
        _TUNED[name] = triton.autotune(configs=_configs(name), key=key)(fn)
    return _TUNED[name]


def _launch(name: str, fn, blocks_along: str, n: int, bh: int, *args, **kwargs) -> None:
    if _interpreting():
        tiles = _interpret_tiles(n)
        fn[(triton.cdiv(n, tiles[blocks_along]), bh)](*args, **kwargs, **tiles)
        return
    grid = lambda meta: (triton.cdiv(n, meta[blocks_along]), bh)  # noqa: E731
    _kernel(name, fn)[grid](*args, **kwargs)


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _keep_args(keep: Optional[torch.Tensor], q: torch.Tensor) -> tuple:
    if keep is None:
        return q, 0, 0
    return keep, keep.stride(0), keep.stride(1)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 tl.dot is wrong and its fp32 -> bf16 casts truncate: multiply
    # the bf16 values in fp32 and round explicitly instead.
    return dtype == torch.bfloat16 and _interpreting()


def _eps_args(keep: Optional[torch.Tensor], eps: float, n: int) -> tuple[bool, float, float]:
    """``(HAS_EPS, log eps, 1/N)``: the eps terms exist only with a keep mask and eps > 0."""
    has_eps = keep is not None and eps > 0
    return has_eps, (math.log(eps) if has_eps else 0.0), 1.0 / max(n, 1)


def _vbar(v: torch.Tensor) -> torch.Tensor:
    """``V̄ = Σ_j v_j`` (B, H, D) float32, contiguous: the eps terms' numerator."""
    return v.sum(dim=2, dtype=torch.float32).contiguous()


def masked_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    scale: float,
    eps: float,
    need_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out, mw, lam, rho, jstar, out32)``.

    ``out`` (B, H, N, D) in the dtype of q; per row (B, H, N) float32 the weighted max
    ``m^w_i``, ``λ_i = log(l_i + r_i)`` and ``ρ_i = eps / S_i`` (0 without eps terms);
    ``jstar`` (B, H, N) int32, the first argmax of each row (-1 without eps terms);
    ``out32`` the float32 output (B, H, N, D) when ``need_grad`` and q is
    float16/bfloat16, else an empty tensor.  ``keep`` is None (G = 1, no eps terms) or a
    float tensor (B, N).  q, k, v may have any strides.  With an empty output (a zero
    dim) the row statistics are placeholders (0, and -1 for jstar).
    """
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    mw, lam, rho = (torch.empty((B, H, N), dtype=torch.float32, device=q.device) for _ in range(3))
    jstar = torch.empty((B, H, N), dtype=torch.int32, device=q.device)
    store_o32 = need_grad and q.dtype != torch.float32
    out32 = torch.empty((B, H, N, D) if store_o32 else (0,), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, mw.zero_(), lam.zero_(), rho.zero_(), jstar.fill_(-1), out32.zero_()
    keep_t, skpb, skpn = _keep_args(keep, q)
    has_eps, log_eps, inv_n = _eps_args(keep, eps, N)
    vbar = _vbar(v) if has_eps else mw
    _launch(
        "fwd", _masked_attention_fwd_kernel, "BLOCK_M", N, B * H,
        q, k, v, keep_t, vbar, out, out32, mw, lam, rho, jstar,
        *_strides(q), *_strides(k), *_strides(v),
        skpb, skpn, H, N, D,
        float(scale), log_eps, inv_n,
        HAS_KEEP=keep is not None, HAS_EPS=has_eps, STORE_O32=store_o32,
        PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out, mw, lam, rho, jstar, out32


def masked_attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    out: torch.Tensor,
    mw: torch.Tensor,
    lam: torch.Tensor,
    rho: torch.Tensor,
    jstar: torch.Tensor,
    out32: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dq, dk, dv, dkeep (B, N) fp32)``; dkeep is zero when keep is None.

    ``out, mw, lam, rho, jstar, out32`` are the forward's outputs; ``Δ = rowsum(dO ∘ O)``
    and the max correction ``dm`` are computed here (a pre-pass kernel), ``Δ`` from
    ``out32`` when it is not empty, else from ``out``.
    """
    B, H, N, D = q.shape
    grad = grad.contiguous()
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, N, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, N, D), dtype=v.dtype, device=q.device)
    dkeep_heads = torch.zeros((B, H, N), dtype=torch.float32, device=q.device)
    if dq.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dkeep_heads.sum(1)
    o = out32.view(B, H, N, D) if out32.numel() else out
    has_eps, _, inv_n = _eps_args(keep, eps, N)
    mw, lam, rho, jstar = mw.contiguous(), lam.contiguous(), rho.contiguous(), jstar.contiguous()
    vbar = _vbar(v) if has_eps else rho
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    dm = torch.empty((B, H, N), dtype=torch.float32, device=q.device) if has_eps else delta
    block_d = max(16, triton.next_power_of_2(D))
    rows = 16 if _interpreting() else 64
    _masked_attention_bwd_delta_kernel[(triton.cdiv(N, rows), B * H)](
        o, grad, vbar, rho, delta, dm, *_strides(o), *_strides(grad), H, N, D, inv_n,
        HAS_EPS=has_eps, BLOCK_M=rows, BLOCK_D=block_d,
    )
    # Σ_i (ρ_i / N) dO_i: the dV of the eps terms, the same for every key
    dvbar = torch.einsum("bhn,bhnd->bhd", rho * inv_n, grad.float()).contiguous() if has_eps else rho
    keep_t, skpb, skpn = _keep_args(keep, q)
    common = dict(HAS_KEEP=keep is not None, HAS_EPS=has_eps, PRECISION=_precision(q.dtype),
                  UPCAST=_upcast(q.dtype), BLOCK_D=block_d)
    # dq, dk, dv and grad are contiguous (B, H, N, D): they share the strides of grad.
    _launch(
        "bwd_dkdv", _masked_attention_bwd_dkdv_kernel, "BLOCK_N", N, B * H,
        q, k, v, keep_t, grad, mw, lam, dvbar, jstar, delta, dm, dk, dv, dkeep_heads,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
        skpb, skpn, H, N, D, float(scale), **common,
    )
    _launch(
        "bwd_dq", _masked_attention_bwd_dq_kernel, "BLOCK_M", N, B * H,
        q, k, v, keep_t, grad, mw, lam, jstar, delta, dm, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
        skpb, skpn, H, N, D, float(scale), **common,
    )
    return dq, dk, dv, dkeep_heads.sum(1)
