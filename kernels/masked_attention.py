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
more per-row registers (``m_i``, ``j*_i``) and, when eps > 0, does two more row
reductions per tile (the all-key max, then the least column that attains it: cheaper
in registers than one max that carries an index per score); per score it adds one add
(``(P − m^w) + log G``), ``log keep`` is taken once per key per tile and ``log G_ii``
once per query row.  ``V̄`` and the eps terms' share of dV, ``Σ_i (ρ_i / N) dO_i``,
are one torch reduction each, outside the kernels.  The backward adds, per score, a
compare and select for the ``G = 0`` guard and one for the argmax column (its padding
masks are gone), and reads three more values per row (``ρ``, ``j*``, ``dm``).  The
dK/dV kernel works on transposed ``(keys × queries)`` tiles, so that its per-key
values (the gate, the dkeep sums) are per-row registers.  The float32 output costs 4
bytes per output element of memory held for the backward, only when a gradient is
needed and the inputs are float16/bfloat16.

Registers.  The autotune lists (``_CONFIG_TABLE``) depend on the kernel, the kind of
product (float16/bfloat16 with wgmma on sm_90, with mma elsewhere; fp32 as FMA) and
the head-dim class: every entry compiles (ptxas; the wgmma lists for sm_90a, the mma
lists for sm_80, the FMA lists for both; contiguous inputs) without spilling for head
dims 32, 64, 128 and 256, with and without a keep mask, and the wgmma lists use no
other tensor-core instruction.  ptxas takes every register it finds useful (up to
255), so the measure of pressure is the least register cap that still compiles without
spilling.  For bf16, D = 64, keep and eps > 0 on sm_90a (registers used / least cap, in
steps of 8): forward 128×64 tiles, 4 warps 255 / 232 (with a single max-with-indices
reduction for ``j*``: 255 / more than 255), 8 warps 178 / 128 (without a keep mask:
230 / 208 and 116 / 96); dK/dV 64×64, 4 warps 255 / 224 and 64 queries × 128 keys,
8 warps 255 / 208 (on (queries × keys) tiles, with the per-key values across the
columns, these two spill 80 and 876 bytes); dQ 64×64, 4 warps 193 / 184.
Speed is not measured here (the interpreter says nothing about it).

A negative, NaN or infinite ``keep_j`` is turned into a NaN gate for every query
(the diagonal included), so the whole batch element comes out NaN, as in the
reference.  In-slice offsets are int64 (``N × row stride`` may exceed 2³¹ in one
(b, h) slice).  Head dims are padded to a power of two (``BLOCK_D``) with masked
loads, any N works (the last tile is masked), inputs may have any strides (the head
dim is read as contiguous: an input with another head-dim stride is copied).  Products
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
def _gate(KEEP, b, skpb, skpn, offs, ok):
    """``(G_ij for j ≠ i, G_jj)`` for the tokens ``offs``: ``keep`` and 1, both NaN when
    ``keep`` is negative or not finite (padding tokens: 0 and 1).  Used for keys (the
    off-diagonal gate) and for queries (the diagonal one, ``G_ii``, as a per-row value)."""
    kp = tl.load(KEEP + b * skpb + _off(offs, skpn), mask=ok, other=0.0).to(tl.float32)
    good = (kp >= 0) & (kp < float("inf"))
    return tl.where(good, kp, float("nan")), tl.where(good, 1.0, float("nan"))


@triton.jit
def _log(g):
    """``log g`` per key, −inf for a dropped key (``g = 0``) without evaluating log 0."""
    pos = g > 0
    return tl.where(pos, tl.log(tl.where(pos, g, 1.0)), tl.where(g == 0, float("-inf"), float("nan")))


@triton.jit
def _masked_attention_fwd_kernel(
    Q, K, V, KEEP, VBAR, O, O32, MW, LAM, RHO, JSTAR,
    sqb, sqh, sqn,
    skb, skh, skn,
    svb, svh, svn,
    skpb, skpn,
    H, N, D,
    scale, log_eps, inv_n,
    HAS_KEEP: tl.constexpr, HAS_EPS: tl.constexpr, STORE_O32: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query block, (b, h)): the online weighted softmax over key tiles.

    Per tile, ``s = P`` (−inf on padding keys); with the eps terms, ``m_i = max_j s_ij``
    and its first argmax ``j*_i`` (two plain row reductions: the max, then the least
    column where ``s`` equals it); with a keep mask, the weighted scores ``s + log G`` with ``log G_ij =
    log keep_j`` off the diagonal and ``log G_ii`` a per-row value (0, or NaN for a bad
    ``keep_i``).  ``m^w ← max(m^w, max_j (s + log G))``, ``α = exp(m^w_old − m^w)``,
    ``w = exp((s − m^w) + log G)``, ``l ← α l + Σ_j w``, ``acc ← α acc + w V``.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + _off(offs_m[:, None], sqn) + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # max_j P_ij (all keys)
    j_star = tl.zeros([BLOCK_M], dtype=tl.int32)                  # its first index
    m_w = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)    # max_j (P_ij + log G_ij)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_KEEP:
        # log G_ii per query row: the diagonal needs no per-key vector
        g_ii = _gate(KEEP, b, skpb, skpn, offs_m, m_ok)[1]
        log_g_ii = _log(g_ii)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = tl.load(k_base + _off(offs_n[None, :], skn) + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + _off(offs_n[:, None], svn) + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if HAS_KEEP:
            if HAS_EPS:
                # the first argmax as a second reduction (a max with indices carries an
                # index per score through the reduction and costs a tile of registers)
                tile_max = tl.max(s, 1)
                first = tl.min(tl.where(s == tile_max[:, None], offs_n[None, :], N), 1)
                j_star = tl.where(tile_max > m_all, first, j_star)  # strict: earlier tiles win ties
                m_all = tl.maximum(m_all, tile_max)
            g_off = _gate(KEEP, b, skpb, skpn, offs_n, n_ok)[0]
            log_g = tl.where(offs_m[:, None] == offs_n[None, :], log_g_ii[:, None], _log(g_off)[None, :])
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
    sob, soh, son,
    sdb, sdh, sdn,
    H, N, D,
    inv_n,
    HAS_EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``Δ_i = dO_i · O_i`` and ``dm_i = ρ_i (dO_i · V̄ / N − Δ_i)`` in float32, BLOCK_M rows per program."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    mask = m_ok[:, None] & d_ok[None, :]
    o = tl.load(O + b * sob + h * soh + _off(offs_m[:, None], son) + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + _off(offs_m[:, None], sdn) + offs_d[None, :],
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
    sqb, sqh, sqn,
    skb, skh, skn,
    svb, svh, svn,
    sdb, sdh, sdn,
    skpb, skpn,
    H, N, D,
    scale,
    HAS_KEEP: tl.constexpr, HAS_EPS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (key block, (b, h)), looping over query tiles in transposed form.

    The tiles are ``(BLOCK_N keys) × (BLOCK_M queries)``: ``Pᵀ = K Qᵀ · scale``,
    ``eᵀ = exp((Pᵀ − m^w) − λ)`` (``e_ij / S_i``), ``aᵀ = G ∘ eᵀ`` (0 where ``G = 0``),
    ``tᵀ = V dOᵀ − Δ``, ``dPᵀ = aᵀ ∘ tᵀ + [j = j*_i] dm_i``; ``dV += aᵀ dO``,
    ``dK += dPᵀ Q``, ``dkeep_j += Σ_{i ≠ j} eᵀ_ji tᵀ_ji``.  Keys on the rows make the
    per-key values (the gate, dkeep) per-row registers and every product a plain (not
    transposed) operand; only ``eᵀ`` lives across the ``V dOᵀ`` product (``aᵀ`` is
    formed again after it).
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D
    nd_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + _off(offs_n[:, None], skn) + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + _off(offs_n[:, None], svn) + offs_d[None, :], mask=nd_mask, other=0.0)
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
        qt = tl.load(q_base + _off(offs_m[None, :], sqn) + offs_d[:, None],
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_base + _off(offs_m[:, None], sdn) + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        mw = tl.load(MW + row_base + offs_m, mask=m_ok, other=0.0)
        lam = tl.load(LAM + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        pt = _dot(k, qt, PRECISION, UPCAST) * scale
        et = tl.exp((pt - mw[None, :]) - lam[None, :])  # e_ij / S_i, relative to the row's largest weight
        # No padding masks here: a padding query has dO = 0 (and Δ = 0), so t = 0 and it adds
        # nothing, and a padding key only reaches its own (never stored) dK, dV and dkeep.
        if HAS_KEEP:
            diag = offs_n[:, None] == offs_m[None, :]
            gt = tl.where(diag, g_diag[:, None], g_off[:, None])
            # G = 0 gives 0 even where e overflowed (a dropped key far above the kept ones, eps = 0)
            at = tl.where(gt != 0, et * gt, 0.0)
        else:
            at = et
        # the eps part of Ã, ρ_i / N, is the same for every key: its dV share is added at the end
        dv += _dot(_rnd(at, UPCAST).to(do.dtype), do, PRECISION, UPCAST)
        tt = _dot(v, tl.trans(do), PRECISION, UPCAST) - delta[None, :]
        if HAS_KEEP:
            dkeep += tl.sum(tl.where(diag, 0.0, et * tt), 1)
            # a again, as (guard, then gate) so that it is recomputed here rather than kept
            # alive across the product above; (e g) t, not e (g t): e g ≤ 1 cannot overflow
            dpt = (tl.where(gt != 0, et, 0.0) * gt) * tt
        else:
            dpt = et * tt
        if HAS_EPS:
            jstar = tl.load(JSTAR + row_base + offs_m, mask=m_ok, other=-1)
            dm = tl.load(DM + row_base + offs_m, mask=m_ok, other=0.0)
            dpt += tl.where(offs_n[:, None] == jstar[None, :], dm[None, :], 0.0)
        dk += _dot(_rnd(dpt, UPCAST).to(qt.dtype), tl.trans(qt), PRECISION, UPCAST)
    dk = dk * scale
    if HAS_EPS:
        dv += tl.load(DVBAR + bh.to(tl.int64) * D + offs_d, mask=d_ok, other=0.0)[None, :]
    out_off = b * sdb + h * sdh + _off(offs_n[:, None], sdn) + offs_d[None, :]
    tl.store(DK + out_off, _rnd(dk, UPCAST).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_off, _rnd(dv, UPCAST).to(DV.dtype.element_ty), mask=nd_mask)
    if HAS_KEEP:
        tl.store(DKEEP + row_base + offs_n, dkeep, mask=n_ok)


@triton.jit
def _masked_attention_bwd_dq_kernel(
    Q, K, V, KEEP, DO, MW, LAM, JSTAR, DELTA, DM, DQ,
    sqb, sqh, sqn,
    skb, skh, skn,
    svb, svh, svn,
    sdb, sdh, sdn,
    skpb, skpn,
    H, N, D,
    scale,
    HAS_KEEP: tl.constexpr, HAS_EPS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query block, (b, h)): ``dQ_i = scale Σ_j dP_ij k_j`` over key tiles,
    ``dP = a ∘ (dO Vᵀ − Δ) + [j = j*_i] dm_i`` with ``a = G ∘ exp((P − m^w) − λ)``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + _off(offs_m[:, None], sqn) + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + _off(offs_m[:, None], sdn) + offs_d[None, :], mask=md_mask, other=0.0)
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
        k = tl.load(k_base + _off(offs_n[:, None], skn) + offs_d[None, :], mask=nd_mask, other=0.0)
        v = tl.load(v_base + _off(offs_n[:, None], svn) + offs_d[None, :], mask=nd_mask, other=0.0)
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
    tl.store(DQ + b * sdb + h * sdh + _off(offs_m[:, None], sdn) + offs_d[None, :],
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


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, kind of product and head-dim
# class (BLOCK_D: 16 and 32 share a list): short lists, so that the first call at a new
# N tunes in seconds.  BLOCK_M counts queries and BLOCK_N keys in every kernel.  Kinds:
# "wgmma" (float16/bfloat16 on sm_90, Hopper), "mma" (float16/bfloat16 elsewhere: the
# lists are checked for sm_80) and "fma" (fp32, IEEE products on the CUDA cores, whose
# operands sit in registers: hence the small tiles).  Every list holds only tiles that
# ptxas compiles without spilling registers on its architecture, with and without a keep
# mask, within its shared memory; "wgmma" tiles have the 64 rows per warpgroup that
# wgmma needs (the queries of fwd and dq, the keys of the transposed dK/dV tiles).
_CONFIG_TABLE: dict[tuple[str, str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", "wgmma", 32): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    ("fwd", "wgmma", 64): [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3),
                           (64, 32, 4, 2)],
    ("fwd", "wgmma", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2)],
    ("fwd", "wgmma", 256): [(64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
    ("fwd", "mma", 32): [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    ("fwd", "mma", 64): [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    ("fwd", "mma", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 2)],
    ("fwd", "mma", 256): [(64, 32, 8, 2), (64, 64, 8, 2)],
    ("fwd", "fma", 32): [(32, 32, 4, 2), (32, 16, 4, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
    ("fwd", "fma", 64): [(32, 16, 4, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
    ("fwd", "fma", 128): [(32, 16, 4, 2), (32, 32, 8, 2)],
    ("fwd", "fma", 256): [(16, 16, 4, 2), (16, 16, 8, 2)],
    ("bwd_dkdv", "wgmma", 32): [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
    ("bwd_dkdv", "wgmma", 64): [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
    ("bwd_dkdv", "wgmma", 128): [(64, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 2)],
    ("bwd_dkdv", "wgmma", 256): [(32, 64, 8, 2)],
    ("bwd_dkdv", "mma", 32): [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
    ("bwd_dkdv", "mma", 64): [(32, 64, 4, 2), (32, 128, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    ("bwd_dkdv", "mma", 128): [(64, 64, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)],
    ("bwd_dkdv", "mma", 256): [(32, 32, 8, 2), (64, 32, 8, 2)],
    ("bwd_dkdv", "fma", 32): [(16, 32, 4, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
    ("bwd_dkdv", "fma", 64): [(32, 16, 4, 2), (16, 32, 4, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
    ("bwd_dkdv", "fma", 128): [(16, 16, 4, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
    ("bwd_dkdv", "fma", 256): [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 8, 1)],
    ("bwd_dq", "wgmma", 32): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2)],
    ("bwd_dq", "wgmma", 64): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2)],
    ("bwd_dq", "wgmma", 128): [(64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (128, 64, 8, 2)],
    ("bwd_dq", "wgmma", 256): [(64, 32, 8, 2), (64, 16, 8, 2)],
    ("bwd_dq", "mma", 32): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
    ("bwd_dq", "mma", 64): [(64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 2)],
    ("bwd_dq", "mma", 128): [(64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
    ("bwd_dq", "mma", 256): [(64, 16, 8, 2), (32, 32, 4, 2), (32, 64, 8, 2)],
    ("bwd_dq", "fma", 32): [(32, 16, 4, 2), (16, 32, 4, 2), (32, 32, 8, 2)],
    ("bwd_dq", "fma", 64): [(32, 16, 4, 2), (16, 32, 4, 2), (32, 32, 8, 2)],
    ("bwd_dq", "fma", 128): [(32, 16, 4, 2), (16, 16, 4, 2)],
    ("bwd_dq", "fma", 256): [(16, 16, 4, 2), (16, 16, 8, 2)],
}


def _product_kind(dtype: torch.dtype, device: torch.device) -> str:
    """The config kind of a launch: "fma" for fp32 (IEEE products), else "wgmma" on an
    sm_90 (Hopper) CUDA device and "mma" on any other."""
    if dtype == torch.float32:
        return "fma"
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9:
        return "wgmma"
    return "mma"


def _configs(name: str, kind: str, block_d: int) -> list:
    """The autotune configs of kernel ``name`` ("fwd", "bwd_dkdv", "bwd_dq") for products of
    ``kind`` (see :func:`_product_kind`) at head-dim tile ``block_d``."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in _CONFIG_TABLE[name, kind, max(32, block_d)]
    ]


_TUNED: dict = {}


def _kernel(name: str, fn: triton.JITFunction, kind: str, block_d: int) -> triton.runtime.Autotuner:
    """The autotuned wrapper of ``fn`` for one config list (built once, only when kernels
    really compile); it tunes per ``N`` and kernel variant."""
    table = (name, kind, max(32, block_d))
    if table not in _TUNED:
        key = ["N", "BLOCK_D", "HAS_KEEP", "HAS_EPS", "PRECISION"]
        _TUNED[table] = triton.autotune(configs=_configs(name, kind, block_d), key=key)(fn)
    return _TUNED[table]


def _launch(
    name: str, fn: triton.JITFunction, blocks_along: str, n: int, bh: int, kind: str, *args, **kwargs
) -> None:
    """Launch ``fn`` over ``(cdiv(n, BLOCK), bh)`` programs: fixed tiles in the interpreter,
    the autotuned configs of ``kind`` on a GPU."""
    if _interpreting():
        tiles = _interpret_tiles(n)
        fn[(triton.cdiv(n, tiles[blocks_along]), bh)](*args, **kwargs, **tiles)
        return
    grid = lambda meta: (triton.cdiv(n, meta[blocks_along]), bh)  # noqa: E731
    _kernel(name, fn, kind, kwargs["BLOCK_D"])[grid](*args, **kwargs)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last (head) dim, copied only when it has another
    one: the kernels take the head dim as contiguous (vector loads, and no per-element
    64-bit addresses)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple:
    """``(batch, head, token)`` strides of a (B, H, N, D) tensor with a unit head-dim stride."""
    return tuple(t.stride()[:3])


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
    float tensor (B, N).  q, k, v may have any strides (one with a head-dim stride other
    than 1 is copied first).  With an empty output (a zero
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
    q, k, v = _rows(q), _rows(k), _rows(v)
    keep_t, skpb, skpn = _keep_args(keep, q)
    has_eps, log_eps, inv_n = _eps_args(keep, eps, N)
    vbar = _vbar(v) if has_eps else mw
    _launch(
        "fwd", _masked_attention_fwd_kernel, "BLOCK_M", N, B * H, _product_kind(q.dtype, q.device),
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
    q, k, v = _rows(q), _rows(k), _rows(v)
    o = _rows(out32.view(B, H, N, D) if out32.numel() else out)
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
    kind = _product_kind(q.dtype, q.device)
    # dq, dk, dv and grad are contiguous (B, H, N, D): they share the strides of grad.
    _launch(
        "bwd_dkdv", _masked_attention_bwd_dkdv_kernel, "BLOCK_N", N, B * H, kind,
        q, k, v, keep_t, grad, mw, lam, dvbar, jstar, delta, dm, dk, dv, dkeep_heads,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
        skpb, skpn, H, N, D, float(scale), **common,
    )
    _launch(
        "bwd_dq", _masked_attention_bwd_dq_kernel, "BLOCK_M", N, B * H, kind,
        q, k, v, keep_t, grad, mw, lam, jstar, delta, dm, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
        skpb, skpn, H, N, D, float(scale), **common,
    )
    return dq, dk, dv, dkeep_heads.sum(1)
