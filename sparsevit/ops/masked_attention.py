"""Masked-softmax attention (DynamicViT) with a learnable key-keep mask, on every backend.

Rao et al., DynamicViT (NeurIPS 2021), Sec. 3.3, Eq. 11, with the eps terms of the
public implementation: with ``P = Q Kᵀ · scale``, ``m_i = max_j P_ij`` over all N keys
and ``G_ij = 1`` if ``i = j`` else ``keep_j``,

    Ã = (exp(P − m) ∘ G + eps/N) / (Σ_j exp(P − m) ∘ G + eps),   out = Ã V,

and the gradient reaches ``keep`` through ``G`` (the token policy is learned
through it).  Backends:

* ``triton``: fused flash-style kernels (``sparsevit.kernels.masked_attention``), no
  (N, N) tensor in memory; the default on CUDA;
* ``cuda``: unfused, torch matmuls around the CUDA masked softmax
  (``csrc/masked_softmax.cu``);
* ``torch``: the same formula materialised in PyTorch (the reference).

The custom op ``torch.ops.sparsevit.masked_attention_fwd`` returns the output and
the per-row statistics (``m_i`` and ``S_i = Σ_j exp(P_ij − m_i) G_ij + eps``) that
``masked_attention_bwd`` needs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..backend import OpSupport, Support, choose_backend
from .masked_softmax import check_eps, check_keep, softmax_bwd_impl, softmax_fwd_impl
from .validation import check_float, check_same_device, check_tensor

__all__ = ["masked_attention", "MASKED_ATTENTION_SUPPORT", "TRITON_MAX_HEAD_DIM"]

TRITON_MAX_HEAD_DIM = 256


def _triton_check(tensors) -> Optional[str]:
    b, h, _, d = tensors[0].shape
    if d > TRITON_MAX_HEAD_DIM:
        return f"head dim D={d} exceeds {TRITON_MAX_HEAD_DIM}"
    if b * h > 65535:
        return f"B*H={b * h} exceeds the 65535 programs of one grid dimension"
    return None


MASKED_ATTENTION_SUPPORT = OpSupport(
    op="masked_attention",
    backends={
        "cuda": Support(devices=frozenset({"cuda"})),
        "triton": Support(check=_triton_check),
        "torch": Support(),
    },
    preference={"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)},
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


def _fwd_impl(q, k, v, keep, scale, eps, backend):
    if backend == "triton":
        return _triton().masked_attention_fwd(q, k, v, keep, scale, eps)
    probs, m, s = softmax_fwd_impl(_scores(q, k, scale), keep, eps, _softmax_backend(backend))
    out = torch.matmul(probs.to(v.dtype).float(), v.float()).to(q.dtype)
    return out, m, s


def _bwd_impl(grad, q, k, v, keep, out, m, s, scale, eps, backend):
    if backend == "triton":
        return _triton().masked_attention_bwd(grad, q, k, v, keep, out, m, s, scale, eps)
    sm = _softmax_backend(backend)
    scores = _scores(q, k, scale)
    probs, _, _ = softmax_fwd_impl(scores, keep, eps, sm)
    g = grad.float()
    dattn = torch.matmul(g, v.float().transpose(-2, -1))
    dp, dkeep = softmax_bwd_impl(dattn, scores, keep, m, s, eps, sm)
    dp = dp.float()
    dq = (torch.matmul(dp, k.float()) * scale).to(q.dtype)
    dk = (torch.matmul(dp.transpose(-2, -1), q.float()) * scale).to(k.dtype)
    dv = torch.matmul(probs.float().transpose(-2, -1), g).to(v.dtype)
    return dq, dk, dv, dkeep.float()


# ----------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------
@torch.library.custom_op("sparsevit::masked_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: Optional[torch.Tensor],
    scale: float,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, keep, scale, eps, backend)


@_fwd_op.register_fake
def _(q, k, v, keep, scale, eps, backend):
    stats = q.shape[:3]
    return (
        q.new_empty(q.shape),
        q.new_empty(stats, dtype=torch.float32),
        q.new_empty(stats, dtype=torch.float32),
    )


@torch.library.custom_op("sparsevit::masked_attention_bwd", mutates_args=())
def _bwd_op(
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad, q, k, v, keep, out, m, s, scale, eps, backend)


@_bwd_op.register_fake
def _(grad, q, k, v, keep, out, m, s, scale, eps, backend):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32),
    )


def _setup(ctx, inputs, output) -> None:
    q, k, v, keep, scale, eps, backend = inputs
    out, m, s = output
    ctx.save_for_backward(q, k, v, keep, out, m, s)
    ctx.scale = scale
    ctx.eps = eps
    ctx.backend = backend
    ctx.mark_non_differentiable(m, s)


def _backward(ctx, grad, grad_m, grad_s):
    q, k, v, keep, out, m, s = ctx.saved_tensors
    dq, dk, dv, dkeep = _bwd_op(grad, q, k, v, keep, out, m, s, ctx.scale, ctx.eps, ctx.backend)
    dkeep = dkeep.to(keep.dtype) if keep is not None and ctx.needs_input_grad[3] else None
    return dq, dk, dv, dkeep, None, None, None


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
    ``G_ij = 1`` if ``i = j`` else ``keep_j``; exponentials and sums in float32.  Every
    row stays defined (its diagonal is always kept); ``eps=0`` gives the exact masked
    softmax.  ``keep=None`` is ordinary softmax attention (no eps terms).

    Args:
        q, k, v: (B, H, N, D) float32/float16/bfloat16 of one dtype, any strides (views
            of a fused qkv projection need no copy on the triton backend).
        keep: (B, N) float in [0, 1] (receives a gradient) or bool (none), or None.
            Values outside [0, 1] are not rejected.
        scale: score scale, default ``D ** -0.5``.
        eps: the stabiliser, >= 0 (DynamicViT uses 1e-6).
        backend: ``"triton"``, ``"cuda"``, ``"torch"`` or None (``SPARSEVIT_BACKEND``,
            else the fastest available: triton on CUDA, torch on the CPU).

    Returns:
        (B, H, N, D) in the dtype of ``q``.  Gradients reach q, k, v and a float
        ``keep``.  The row max ``m_i`` is treated as a constant in the backward; the
        public implementation differentiates through it, which changes the gradients
        only by terms of order eps (none at all for eps = 0).  With
        ``Δ_i = dO_i · O_i`` and ``t_ij = (dO_i · v_j − Δ_i) / S_i``:
        ``dP_ij = exp(P_ij − m_i) G_ij t_ij``, ``dkeep_j = Σ_{h, i ≠ j} exp(P_ij − m_i) t_ij``.
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
    return _fwd_op(q, k, v, keep, float(scale), eps, name)[0]

