"""DynamicViT's masked softmax over materialised attention scores, with autograd.

Rao et al., DynamicViT (NeurIPS 2021), Eq. 11, as in the public ``softmax_with_policy``:
with scores ``P (B, H, N, N)``, ``m_i = max_j P_ij`` over all keys and ``G_ij = 1`` if
``i = j`` else ``keep_j``,

    Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps).

This is the unfused op, for when the probabilities themselves are wanted
(visualisation, class-token attention for token ranking, attention dropout).  The
fused attention is :func:`sparsevit.masked_attention`.  Backends: ``cuda``
(``csrc/masked_softmax.cu``, one warp per row) and ``torch`` (:mod:`sparsevit.reference`).

Both evaluate Ã relative to the largest weight of each row: with the weighted max
``m^w_i = max_j (P_ij + log G_ij)`` they keep ``m^w_i`` and the log-denominator at that
scale, ``λ_i = log(Σ_j exp(P_ij + log G_ij − m^w_i) + eps·exp(m_i − m^w_i))``, so no
exponential leaves float32's range whatever the dropped keys do (the closed forms are
in :mod:`sparsevit.reference`).  The backward is the exact gradient of the formula,
through ``m_i`` included (see :func:`masked_softmax`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..backend import OpSupport, Support, choose_backend
from .validation import check_float, check_same_device, check_tensor

__all__ = ["masked_softmax", "MASKED_SOFTMAX_SUPPORT", "check_keep", "check_eps"]

MASKED_SOFTMAX_SUPPORT = OpSupport(
    op="masked_softmax",
    backends={
        "cuda": Support(devices=frozenset({"cuda"})),
        "torch": Support(),
    },
)


def check_keep(keep: object, b: int, n: int, like: torch.Tensor, like_name: str) -> Optional[torch.Tensor]:
    """``keep`` must be None or a (B, N) bool or float tensor on the device of ``like``.

    Returns None or a float tensor (bool becomes a float32 tensor without gradient).
    The values are not inspected (that would cost a device sync): a negative or
    non-finite entry makes the op's output NaN for that batch element.
    """
    if keep is None:
        return None
    keep = check_tensor("keep", keep, 2, "(B, N)")
    check_same_device([(like_name, like), ("keep", keep)])
    if tuple(keep.shape) != (b, n):
        hint = ""
        if like.dim() == 4 and keep.shape[0] == b and keep.shape[1] == like.shape[1] != n:
            hint = (f"; keep's N={keep.shape[1]} matches dim 1 of {like_name} {tuple(like.shape)}: is {like_name} "
                    f"(B, N, H, D)? The layout is (B, H, N, D): use {like_name}.transpose(1, 2)")
        raise ValueError(f"keep must be (B, N) = ({b}, {n}) to match {like_name}, got shape {tuple(keep.shape)}{hint}")
    if keep.dtype == torch.bool:
        return keep.to(torch.float32)
    if keep.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"keep must be bool or floating point (values in [0, 1]), got {keep.dtype}")
    return keep


def check_eps(eps: object) -> float:
    """``eps`` must be a finite float >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return float(eps)


# ----------------------------------------------------------------------------------
# Backend implementations
# ----------------------------------------------------------------------------------
def softmax_fwd_impl(
    scores: torch.Tensor, keep: Optional[torch.Tensor], eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Ã dtype of scores, m^w fp32, λ fp32)`` on ``backend`` (``cuda`` or ``torch``).

    The row statistics (B, H, N) of :func:`sparsevit.reference.masked_softmax_stats`.
    """
    if backend == "cuda":
        return torch.ops.sparsevit.masked_softmax_cuda(scores, keep, eps)
    probs, mw, lam = reference.masked_softmax_stats(scores, keep, eps)
    return probs.to(scores.dtype), mw, lam


def softmax_bwd_impl(
    grad: torch.Tensor,
    scores: torch.Tensor,
    keep: Optional[torch.Tensor],
    mw: torch.Tensor,
    lam: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dP float32, dkeep (B, N) float32)`` on ``backend``, the gradient through the row max included.

    ``mw, lam`` are the forward's statistics; the row max, its first index and ``ρ``
    are found again while the row is read.  The CUDA kernel sums ``dkeep`` with float
    atomics (order-dependent rounding); under ``torch.use_deterministic_algorithms(True)``
    a ``keep`` gradient is taken by the closed form in torch instead, which is
    reproducible bit for bit.
    """
    deterministic = keep is not None and torch.are_deterministic_algorithms_enabled()
    if backend == "cuda" and not deterministic:
        return torch.ops.sparsevit.masked_softmax_backward_cuda(grad, scores, keep, mw, lam, eps)
    return reference.masked_softmax_grads(grad, scores, keep, mw, lam, eps)


# ----------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------
@torch.library.custom_op("sparsevit::masked_softmax_fwd", mutates_args=())
def _fwd_op(
    scores: torch.Tensor, keep: Optional[torch.Tensor], eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return softmax_fwd_impl(scores, keep, eps, backend)


@_fwd_op.register_fake
def _(scores, keep, eps, backend):
    stats = scores.shape[:3]
    return (
        scores.new_empty(scores.shape),
        scores.new_empty(stats, dtype=torch.float32),
        scores.new_empty(stats, dtype=torch.float32),
    )


@torch.library.custom_op("sparsevit::masked_softmax_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor,
    scores: torch.Tensor,
    keep: Optional[torch.Tensor],
    mw: torch.Tensor,
    lam: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    dp, dkeep = softmax_bwd_impl(grad, scores, keep, mw, lam, eps, backend)
    return dp.to(scores.dtype), dkeep


@_bwd_op.register_fake
def _(grad, scores, keep, mw, lam, eps, backend):
    return scores.new_empty(scores.shape), scores.new_empty((scores.shape[0], scores.shape[-1]), dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    scores, keep, eps, backend = inputs
    _, mw, lam = output
    ctx.save_for_backward(scores, keep, mw, lam)
    ctx.eps = eps
    ctx.backend = backend
    ctx.mark_non_differentiable(mw, lam)


def _backward(ctx, grad, *unused):
    scores, keep, mw, lam = ctx.saved_tensors
    dscores, dkeep = _bwd_op(grad, scores, keep, mw, lam, ctx.eps, ctx.backend)
    dkeep = dkeep.to(keep.dtype) if keep is not None and ctx.needs_input_grad[1] else None
    return dscores, dkeep, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------
def masked_softmax(
    scores: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """DynamicViT's masked softmax over the last dim of attention scores.

    ``Ã_ij = (exp(P_ij − m_i) G_ij + eps/N) / (Σ_k exp(P_ik − m_i) G_ik + eps)`` with
    ``m_i = max_k P_ik`` over all N keys (kept or not) and ``G_ij = 1`` if ``i = j``
    else ``keep_j``; exponentials and sums in float32.  Every row stays defined (its
    diagonal is always kept); ``eps=0`` is the exact masked softmax.

    Args:
        scores: (B, H, N, N) float32/float16/bfloat16 (any strides; N may be 0).
        keep: (B, N) float >= 0 (DynamicViT's are in [0, 1]; receives a gradient) or
            bool (none), or None for the ordinary softmax (the eps terms are then
            dropped).  Not inspected: a negative, NaN or infinite ``keep_j`` makes every
            row of batch element b NaN, on every backend (as the public formula does
            for a non-finite one).
        eps: the stabiliser, >= 0 (DynamicViT uses 1e-6).
        backend: ``"cuda"``, ``"torch"`` or None (``SPARSEVIT_BACKEND``, else the fastest).

    Returns:
        (B, H, N, N) probabilities in the dtype of ``scores``.  The backward is the
        exact gradient of the formula, as the public implementation's autograd
        computes it (through ``m_i``, to the first maximal key ``j*_i``): with
        ``S_i`` the denominator, ``ρ_i = eps / S_i`` and ``Δ_i = Σ_j dÃ_ij Ã_ij``,
        ``dP_ij = exp(P_ij − m_i) G_ij (dÃ_ij − Δ_i) / S_i + [j = j*_i] ρ_i (mean_j dÃ_ij − Δ_i)``
        and ``dkeep_j = Σ_{h, i ≠ j} exp(P_ij − m_i) (dÃ_ij − Δ_i) / S_i``.
    """
    scores = check_tensor("scores", scores, 4, "(B, H, N, N)")
    check_float("scores", scores)
    b, _, n, n2 = scores.shape
    if n != n2:
        raise ValueError(f"scores must be square in its last two dims (B, H, N, N), got shape {tuple(scores.shape)}")
    keep = check_keep(keep, b, n, scores, "scores")
    eps = check_eps(eps)
    if keep is None:
        eps = 0.0
    name = choose_backend(MASKED_SOFTMAX_SUPPORT, [scores], backend)
    return _fwd_op(scores, keep, eps, name)[0]
