"""Masked-softmax attention (DynamicViT) with a learnable key-keep mask, on every backend.

Rao et al., DynamicViT (NeurIPS 2021), Sec. 3.3, Eq. 11, with the eps terms of the
public implementation: with ``P = Q Kᵀ · scale``, ``m_i = max_j P_ij`` over all N keys
and ``G_ij = 1`` if ``i = j`` else ``keep_j``,

    Ã = (exp(P − m) ∘ G + eps/N) / (Σ_j exp(P − m) ∘ G + eps),   out = Ã V,

and the gradient reaches ``keep`` through ``G`` (the token policy is learned
through it) and every input through ``m`` as in the public code's autograd.  Backends:

* ``triton``: fused flash-style kernels (``sparsevit.kernels.masked_attention``), no
  (N, N) tensor in memory; the default on CUDA;
* ``cuda``: unfused, torch matmuls around the CUDA masked softmax
  (``csrc/masked_softmax.cu``);
* ``torch``: the same formula materialised in PyTorch (the closed forms of
  :mod:`sparsevit.reference`).

The custom op ``torch.ops.sparsevit.masked_attention_fwd`` returns the output and
what ``masked_attention_bwd`` needs: per row (B, H, N, float32) the weighted max
``m^w_i = max_j (P_ij + log G_ij)`` and the log-denominator at that scale ``λ_i`` (see
:mod:`sparsevit.reference`), then, from the triton backend only (the others rebuild
them from the scores in the backward; empty tensors there), ``ρ_i = eps / S_i``
(float32), the first maximal key ``j*_i`` (int32, -1 when eps = 0: the max then has
no gradient) and, for float16/bfloat16 inputs that need a gradient, the float32
output (B, H, N, D) from which the backward forms ``Δ_i = dO_i · O_i`` (from the
rounded output, ``Δ`` would lose the cancellation ``dO_i · (v_j − O_i)`` of a row that
attends to one key).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..backend import OpSupport, Support, choose_backend
from .masked_softmax import check_eps, check_keep, softmax_bwd_impl, softmax_fwd_impl
from .validation import check_float, check_same_device, check_tensor

__all__ = ["masked_attention", "MASKED_ATTENTION_SUPPORT", "TRITON_MAX_HEAD_DIM", "TRITON_MAX_SLICES"]

TRITON_MAX_HEAD_DIM = 256
TRITON_MAX_SLICES = 65535  # B·H programs along grid axis 1


def _triton_check(tensors) -> Optional[str]:
    b, h, n, d = tensors[0].shape
    if d > TRITON_MAX_HEAD_DIM:
        return f"head dim D={d} exceeds {TRITON_MAX_HEAD_DIM}"
    if b * h > TRITON_MAX_SLICES:
        return f"B*H={b * h} exceeds the {TRITON_MAX_SLICES} programs of one grid dimension"
    if n * d >= 2 ** 31:
        # the output is addressed with int32 offsets inside each (b, h) slice (the inputs, of
        # any strides, with int64 ones)
        return f"N*D={n * d} elements in one (b, h) slice of the output exceed 2^31 - 1"
    return None


MASKED_ATTENTION_SUPPORT = OpSupport(
    op="masked_attention",
    backends={
        "cuda": Support(devices=frozenset({"cuda"})),
        "triton": Support(check=_triton_check),
        "torch": Support(),
    },
)


# ----------------------------------------------------------------------------------
# Backend implementations
# ----------------------------------------------------------------------------------
def _triton():
    from ..kernels import masked_attention

    return masked_attention


def _softmax_backend(backend: str) -> str:
    return "cuda" if backend == "cuda" else "torch"


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale


def _none(q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.new_empty((0,), dtype=dtype)


def _fwd_impl(q, k, v, keep, scale, eps, backend, need_grad):
    eps = eps if keep is not None else 0.0  # keep=None is plain softmax attention on every backend
    if backend == "triton":
        return _triton().masked_attention_fwd(q, k, v, keep, scale, eps, need_grad)
    probs, mw, lam = softmax_fwd_impl(_scores(q, k, scale), keep, eps, _softmax_backend(backend))
    out = torch.matmul(probs.to(v.dtype).float(), v.float()).to(q.dtype)
    return out, mw, lam, _none(q), _none(q, torch.int32), _none(q)


def _bwd_impl(grad, q, k, v, keep, out, mw, lam, rho, jstar, out32, scale, eps, backend):
    eps = eps if keep is not None else 0.0
    if backend == "triton":
        return _triton().masked_attention_bwd(grad, q, k, v, keep, out, mw, lam, rho, jstar, out32, scale, eps)
    sm = _softmax_backend(backend)
    scores = _scores(q, k, scale)
    probs, _, _ = softmax_fwd_impl(scores, keep, eps, sm)
    g = grad.float()
    dattn = torch.matmul(g, v.float().transpose(-2, -1))
    dp, dkeep = softmax_bwd_impl(dattn, scores, keep, mw, lam, eps, sm)
    dp = dp.float()
    dq = (torch.matmul(dp, k.float()) * scale).to(q.dtype)
    dk = (torch.matmul(dp.transpose(-2, -1), q.float()) * scale).to(k.dtype)
    dv = torch.matmul(probs.float().transpose(-2, -1), g).to(v.dtype)
    return dq, dk, dv, dkeep.float()


# ----------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------
def _triton_stats(q: torch.Tensor, backend: str) -> tuple:
    return q.shape[:3] if backend == "triton" else (0,)


def _out32_shape(q: torch.Tensor, backend: str, need_grad: bool) -> tuple:
    return q.shape if backend == "triton" and need_grad and q.dtype != torch.float32 else (0,)


@torch.library.custom_op("sparsevit::masked_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    scale: float,
    eps: float,
    backend: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, keep, scale, eps, backend, need_grad)


@_fwd_op.register_fake
def _(q, k, v, keep, scale, eps, backend, need_grad):
    stats = q.shape[:3]
    return (
        q.new_empty(q.shape),
        q.new_empty(stats, dtype=torch.float32),
        q.new_empty(stats, dtype=torch.float32),
        q.new_empty(_triton_stats(q, backend), dtype=torch.float32),
        q.new_empty(_triton_stats(q, backend), dtype=torch.int32),
        q.new_empty(_out32_shape(q, backend, need_grad), dtype=torch.float32),
    )


@torch.library.custom_op("sparsevit::masked_attention_bwd", mutates_args=())
def _bwd_op(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad, q, k, v, keep, out, mw, lam, rho, jstar, out32, scale, eps, backend)


@_bwd_op.register_fake
def _(grad, q, k, v, keep, out, mw, lam, rho, jstar, out32, scale, eps, backend):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32),
    )


def _setup(ctx, inputs, output) -> None:
    q, k, v, keep, scale, eps, backend, _ = inputs
    out, *stats = output
    ctx.save_for_backward(q, k, v, keep, out, *stats)
    ctx.scale = scale
    ctx.eps = eps
    ctx.backend = backend
    ctx.mark_non_differentiable(*stats)


def _backward(ctx, grad, *unused):
    q, k, v, keep, out, *stats = ctx.saved_tensors
    dq, dk, dv, dkeep = _bwd_op(grad, q, k, v, keep, out, *stats, ctx.scale, ctx.eps, ctx.backend)
    dkeep = dkeep.to(keep.dtype) if keep is not None and ctx.needs_input_grad[3] else None
    return dq, dk, dv, dkeep, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------
def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    eps: float = 1e-6,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention with DynamicViT's key-keep mask: ``out = Ã V``.

    ``Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps)`` with
    ``P = Q Kᵀ · scale``, ``m_i = max_k P_ik`` over all N keys (kept or not) and
    ``G_ij = 1`` if ``i = j`` else ``keep_j``; exponentials and sums in float32, never
    outside its range (the weights are evaluated relative to the largest weighted
    score, and the all-key max enters as a float32 factor).  Every row stays defined
    (its diagonal is always kept); ``eps=0`` gives the exact masked softmax.
    ``keep=None`` is ordinary softmax attention (no eps terms).

    Args:
        q, k, v: (B, H, N, D) float32/float16/bfloat16 of one dtype, any strides (views
            of a fused qkv projection need no copy on the triton backend); any of
            B, H, N, D may be 0.
        keep: (B, N) float >= 0 (DynamicViT's are in [0, 1]; receives a gradient) or
            bool (none), or None.  Not inspected (that would cost a device sync): a
            negative, NaN or infinite ``keep_j`` makes every output row of batch
            element b NaN, on every backend.
        scale: score scale, default ``D ** -0.5``.
        eps: the stabiliser, >= 0 (DynamicViT uses 1e-6).
        backend: ``"triton"``, ``"cuda"``, ``"torch"`` or None (``SPARSEVIT_BACKEND``,
            else the fastest available: triton on CUDA, torch on the CPU).

    Returns:
        (B, H, N, D) in the dtype of ``q``.  Gradients reach q, k, v and a float
        ``keep``; they are the exact gradients of the formula, through ``m_i`` too,
        as the public implementation's autograd computes them (``torch.max`` sends
        the gradient of ``m_i`` to the first maximal key ``j*_i``).  With
        ``S_i = Σ_k exp(P_ik − m_i) G_ik + eps``, ``ρ_i = eps / S_i``,
        ``Δ_i = dO_i · O_i``, ``V̄ = Σ_j v_j`` and ``dÃ_ij = dO_i · v_j``:
        ``dP_ij = exp(P_ij − m_i) G_ij (dÃ_ij − Δ_i) / S_i + [j = j*_i] ρ_i (dO_i · V̄ / N − Δ_i)``,
        ``dkeep_j = Σ_{h, i ≠ j} exp(P_ij − m_i) (dÃ_ij − Δ_i) / S_i``.
    """
    q = check_tensor("q", q, 4, "(B, H, N, D)")
    k = check_tensor("k", k, 4, "(B, H, N, D)")
    v = check_tensor("v", v, 4, "(B, H, N, D)")
    check_float("q", q)
    check_same_device([("q", q), ("k", k), ("v", v)])
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q (B, H, N, D) = {tuple(q.shape)}, got {tuple(t.shape)}")
    b, _, n, d = q.shape
    keep = check_keep(keep, b, n, q, "q")
    eps = check_eps(eps)
    if keep is None:
        eps = 0.0
    if scale is None:
        scale = d ** -0.5 if d > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    name = choose_backend(MASKED_ATTENTION_SUPPORT, [q, k, v], backend)
    inputs = (q, k, v) if keep is None else (q, k, v, keep)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    return _fwd_op(q, k, v, keep, float(scale), eps, name, need_grad)[0]
