"""A bounded straight-through gradient for DynamicViT's attention keep mask.

In training, the keep mask ``G_ij = D̂_j`` (``i ≠ j``) enters the masked softmax
``Ã_ij = (e_ij G_ij + ε/N) / (S_i + ε)``, ``e_ij = exp(P_ij − max_k P_ik)``,
``S_i = Σ_k e_ik G_ik``, whose derivative at a dropped key (``G_ij = 0``) is

    ∂Ã_ij / ∂G_ij = e_ij / (S_i + ε)

-- the slope at ``G = 0`` of ``G e / (S + G e)``, which is ``≫ 1`` when the dropped key
would dominate the row (``e_ij ≫ S_i``), although keeping the token changes ``Ã_ij`` by at
most 1.  With a sharp, well-trained attention these tangents reach 10⁴–10⁵ times the
ratio loss's gradient, so the straight-through estimate sent to the predictors is
dominated by them and the keep ratio is no longer controlled.  :func:`clip_keep_grad`
leaves the forward value unchanged and clamps the gradient reaching ``D̂`` from the
attention blocks elementwise to ``[−c, c]``.
"""

from __future__ import annotations

import torch

__all__ = ["clip_keep_grad"]


class _ClipGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float) -> torch.Tensor:  # type: ignore[override]
        ctx.bound = bound
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad.clamp(-ctx.bound, ctx.bound), None


def clip_keep_grad(keep: torch.Tensor, bound: float) -> torch.Tensor:
    """``keep`` in the forward pass; its gradient clamped to ``[−bound, bound]`` elementwise in the backward."""
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ValueError(f"bound must be a float > 0, got {bound!r}")
    return _ClipGrad.apply(keep, float(bound))
