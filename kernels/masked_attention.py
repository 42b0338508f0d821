"""Triton kernels for DynamicViT's masked-softmax attention, flash-style (forward + backward).

Implements Rao et al., DynamicViT (NeurIPS 2021), Eq. 11 with the public code's eps
terms, fused in the manner of FlashAttention-2 (Dao 2023, Alg. 1 and 2): with
``P = Q Kᵀ · scale``, ``m_i = max_j P_ij`` over all N keys, ``G_ij = 1`` if ``i = j``
else ``keep_j`` and ``e_ij = exp(P_ij − m_i)``,

    out_i = (Σ_j e_ij G_ij v_j + eps/N · Σ_j v_j) / (Σ_j e_ij G_ij + eps).

Online softmax: the running max ``m`` rescales the numerator ``acc`` and the
denominator ``l``, which after the last key block are relative to the full-row max.
The eps terms do not depend on ``m``, so ``Σ_j v_j`` is accumulated unscaled and
added once at the end.  No (N, N) tensor reaches memory; the forward stores the row
statistics ``m_i`` and ``S_i = Σ_j e_ij G_ij + eps`` (float32) for the backward.

Backward (``m`` constant; ``Δ_i = dO_i · O_i``, ``dÃ_ij = dO_i · v_j``,
``t_ij = (dÃ_ij − Δ_i) / S_i``):

* ``dV_j = Σ_i Ã_ij dO_i``, ``dK_j = scale Σ_i e_ij G_ij t_ij q_i``,
  ``dkeep_j = Σ_{i ≠ j} e_ij t_ij`` (per head): one program per key block;
* ``dQ_i = scale Σ_j e_ij G_ij t_ij k_j``: one program per query block.

Head dims are padded to a power of two (``BLOCK_D``) with masked loads, any N works
(the last tile is masked), inputs may have any strides.  Products accumulate in
float32; fp32 inputs use IEEE (not TF32) products.  Under ``TRITON_INTERPRET=1``
fixed small tiles are used; on a GPU the tile sizes are autotuned.
"""

from __future__ import annotations

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
def _masked_attention_fwd_kernel(
    Q, K, V, KEEP, O, M, S,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    skpb, skpn,
    H, N, D,
    scale, eps, eps_n,
    HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    vsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST) * scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        e = tl.exp(s - m_new[:, None])
        if HAS_KEEP:
            kp = tl.load(KEEP + b * skpb + offs_n * skpn, mask=n_ok, other=0.0).to(tl.float32)
            e = tl.where(offs_m[:, None] == offs_n[None, :], e, e * kp[None, :])
            vsum += tl.sum(v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(e, 1)
        acc = acc * alpha[:, None] + _dot(_rnd(e, UPCAST).to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    s_i = tl.where(m_ok, l_i + eps, 1.0)  # padding rows: avoid 0/0 (never stored)
    if HAS_KEEP:
        acc += eps_n * vsum[None, :]
    out = acc / s_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             _rnd(out, UPCAST).to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    row = bh.to(tl.int64) * N + offs_m
    tl.store(M + row, m_i, mask=m_ok)
    tl.store(S + row, s_i, mask=m_ok)


@triton.jit
def _masked_attention_bwd_delta_kernel(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Δ_i = dO_i · O_i in float32, one (B, H) slice and BLOCK_M rows per program.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=m_ok)


@triton.jit
def _masked_attention_bwd_dkdv_kernel(
    Q, K, V, KEEP, DO, M, S, DELTA, DK, DV, DKEEP,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    skpb, skpn,
    H, N, D,
    scale, eps_n,
    HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
    if HAS_KEEP:
        kp = tl.load(KEEP + b * skpb + offs_n * skpn, mask=n_ok, other=0.0).to(tl.float32)
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
        q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=md_mask, other=0.0)
        m = tl.load(M + row_base + offs_m, mask=m_ok, other=0.0)
        s_i = tl.load(S + row_base + offs_m, mask=m_ok, other=1.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        inv_s = 1.0 / s_i
        valid = m_ok[:, None] & n_ok[None, :]
        diag = offs_m[:, None] == offs_n[None, :]
        p = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        e = tl.where(valid, tl.exp(p - m[:, None]), 0.0)
        if HAS_KEEP:
            w = tl.where(diag, e, e * kp[None, :])
            a = tl.where(valid, (w + eps_n) * inv_s[:, None], 0.0)
        else:
            w = e
            a = w * inv_s[:, None]
        dv += _dot(tl.trans(_rnd(a, UPCAST)).to(do.dtype), do, PRECISION, UPCAST)
        da = _dot(do, tl.trans(v), PRECISION, UPCAST)
        t = (da - delta[:, None]) * inv_s[:, None]
        dp = w * t
        dk += _dot(tl.trans(_rnd(dp, UPCAST)).to(q.dtype), q, PRECISION, UPCAST)
        if HAS_KEEP:
            dkeep += tl.sum(tl.where(diag, 0.0, e * t), 0)
    dk = dk * scale
    out_off = b * sdb + h * sdh + offs_n[:, None] * sdn + offs_d[None, :] * sdd
    tl.store(DK + out_off, _rnd(dk, UPCAST).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_off, _rnd(dv, UPCAST).to(DV.dtype.element_ty), mask=nd_mask)
    if HAS_KEEP:
        tl.store(DKEEP + row_base + offs_n, dkeep, mask=n_ok)


@triton.jit
def _masked_attention_bwd_dq_kernel(
    Q, K, V, KEEP, DO, M, S, DELTA, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdn, sdd,
    skpb, skpn,
    H, N, D,
    scale,
    HAS_KEEP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=md_mask, other=0.0)
    row_base = bh.to(tl.int64) * N
    m = tl.load(M + row_base + offs_m, mask=m_ok, other=0.0)
    s_i = tl.load(S + row_base + offs_m, mask=m_ok, other=1.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    inv_s = 1.0 / s_i
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        nd_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_mask, other=0.0)
        p = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale
        w = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(p - m[:, None]), 0.0)
        if HAS_KEEP:
            kp = tl.load(KEEP + b * skpb + offs_n * skpn, mask=n_ok, other=0.0).to(tl.float32)
            w = tl.where(offs_m[:, None] == offs_n[None, :], w, w * kp[None, :])
        da = _dot(do, tl.trans(v), PRECISION, UPCAST)
        dp = w * ((da - delta[:, None]) * inv_s[:, None])
        dq += _dot(_rnd(dp, UPCAST).to(k.dtype), k, PRECISION, UPCAST)
    dq = dq * scale
    tl.store(DQ + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
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
        _TUNED[name] = triton.autotune(configs=_configs(name), key=["N", "BLOCK_D", "HAS_KEEP", "PRECISION"])(fn)
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


def masked_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out (B, H, N, D) dtype of q, m (B, H, N) fp32, S (B, H, N) fp32)``.

    ``keep`` is None (G = 1; pass ``eps=0`` for plain softmax attention) or a float
    tensor (B, N).  q, k, v may have any strides.
    """
    B, H, N, D = q.shape
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    m = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    s = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, m.fill_(0), s.fill_(1)
    keep_t, skpb, skpn = _keep_args(keep, q)
    _launch(
        "fwd", _masked_attention_fwd_kernel, "BLOCK_M", N, B * H,
        q, k, v, keep_t, out, m, s,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        skpb, skpn, H, N, D,
        float(scale), float(eps), float(eps) / N,
        HAS_KEEP=keep is not None, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out, m, s


def masked_attention_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    out: torch.Tensor,
    m: torch.Tensor,
    s: torch.Tensor,
    scale: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: ``(dq, dk, dv, dkeep (B, N) fp32)``; dkeep is zero when keep is None.

    ``out, m, s`` are the forward's outputs; ``Δ = rowsum(dO ∘ O)`` is computed here
    (a pre-pass kernel, from the rounded ``out`` as in FlashAttention).
    """
    B, H, N, D = q.shape
    grad = grad.contiguous()
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, N, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, N, D), dtype=v.dtype, device=q.device)
    dkeep_heads = torch.zeros((B, H, N), dtype=torch.float32, device=q.device)
    if dq.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dkeep_heads.sum(1)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    rows = 16 if _interpreting() else 64
    _masked_attention_bwd_delta_kernel[(triton.cdiv(N, rows), B * H)](
        out, grad, delta, *_strides(out), *_strides(grad), H, N, D, BLOCK_M=rows, BLOCK_D=block_d,
    )
    m = m.contiguous()
    s = s.contiguous()
    keep_t, skpb, skpn = _keep_args(keep, q)
    common = dict(HAS_KEEP=keep is not None, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
                  BLOCK_D=max(16, triton.next_power_of_2(D)))
    # dq, dk, dv and grad are contiguous (B, H, N, D): they share the strides of grad.
    _launch(
        "bwd_dkdv", _masked_attention_bwd_dkdv_kernel, "BLOCK_N", N, B * H,
        q, k, v, keep_t, grad, m, s, delta, dk, dv, dkeep_heads,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
        skpb, skpn, H, N, D, float(scale), float(eps) / N, **common,
    )
    _launch(
        "bwd_dq", _masked_attention_bwd_dq_kernel, "BLOCK_M", N, B * H,
        q, k, v, keep_t, grad, m, s, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad),
        skpb, skpn, H, N, D, float(scale), **common,
    )
    return dq, dk, dv, dkeep_heads.sum(1)
