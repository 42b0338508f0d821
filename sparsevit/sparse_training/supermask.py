"""Supermasks: strong lottery tickets found by edge-popup (Ramanujan et al., CVPR 2020, Alg. 1).

The weights stay frozen at their random initialisation, a *signed constant*

    W_ij = σ · sign(N(0, 1)),   σ = sqrt(2 / fan_in)         (Kaiming std; §4.1 of the paper)

and every weight (or every ``b × b`` block) gets a learned score ``s``.  The
forward pass uses the top ``k = round(d · units)`` scores of each layer by ``|s|``:

    W̃ = W ⊙ expand(h(|s|)),   h(|s|)_u = 1 if |s|_u is among the k largest else 0,

and the backward pass is straight-through: ``∂L/∂s_u = ∂L/∂h_u`` (times the sign
of ``s``, the derivative of ``|s|``); for blocks ``∂L/∂h_u`` sums the gradient of
the block's elements.  Only the scores train.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .density import check_sparsity
from .masks import LayerFilter, MaskedWeight, check_granularity, default_filter, topk_mask
from .sharding import is_dtensor

__all__ = ["SupermaskLayer", "convert_to_supermask", "supermask_layers", "topk_straight_through"]


class _TopKStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        return topk_mask(scores, k).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def topk_straight_through(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``h(s)``: 1.0 at the ``k`` largest entries of ``scores``, 0.0 elsewhere; gradient passed straight through."""
    return _TopKStraightThrough.apply(scores, int(k))


class SupermaskLayer(nn.Module):
    """A Linear or Conv2d with frozen signed-constant weights and learned top-k scores (per weight or per block).

    ``inner``: the wrapped layer (its ``weight`` and ``bias`` frozen);
    ``scores``: weight-shaped, or ``(M/b, K/b)`` for ``block_size`` b.
    """

    def __init__(self, inner: nn.Module, density: float, block_size: Optional[int] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(inner, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"inner must be an nn.Linear or nn.Conv2d, got {type(inner).__name__}")
        if not (0.0 < density <= 1.0):
            raise ValueError(f"density must lie in (0, 1], got {density}")
        self.inner = inner
        self.density = float(density)
        self.block_size = block_size
        self._geometry = MaskedWeight("inner", inner, block_size)
        w = inner.weight
        fan_in = w.numel() // w.shape[0]
        sigma = math.sqrt(2.0 / fan_in)
        with torch.no_grad():
            signs = torch.randn(w.shape, generator=generator).sign()
            signs[signs == 0] = 1.0
            w.copy_((signs * sigma).to(w))
        w.requires_grad_(False)
        if inner.bias is not None:
            inner.bias.requires_grad_(False)
        # edge-popup initialises scores like weights (Kaiming uniform) and ranks |s|.
        bound = 1.0 / math.sqrt(max(1, self._geometry.unit_shape[-1]))
        init = (torch.rand(self._geometry.unit_shape, generator=generator) * 2 - 1) * bound
        self.scores = nn.Parameter(init.to(device=w.device, dtype=torch.float32))

    @property
    def k(self) -> int:
        """Kept units: ``round(d · units)``."""
        return int(round(self.density * self.scores.numel()))

    def unit_mask(self) -> torch.Tensor:
        """The current top-k mask of units (bool, the shape of ``scores``).

        Under FSDP2 (``fully_shard`` after :func:`convert_to_supermask`) the forward pass ranks
        the gathered scores; here the sharded scores are gathered too (a collective).
        """
        scores = self.scores.detach()
        if is_dtensor(scores):
            scores = scores.full_tensor()
        return topk_mask(scores.abs(), self.k)

    def block_mask(self) -> torch.Tensor:
        """The ``(M/b, K/b)`` bool block mask (ValueError for per-weight scores)."""
        if self.block_size is None:
            raise ValueError("this supermask has a score per weight: its mask has no block structure")
        return self.unit_mask()

    def effective_weight(self) -> torch.Tensor:
        """``W ⊙ expand(h(|s|))``, differentiable in the scores (straight-through)."""
        h = topk_straight_through(self.scores.abs(), self.k)
        if self.block_size is not None:
            b = self.block_size
            h = h.repeat_interleave(b, 0).repeat_interleave(b, 1)
        w = self.inner.weight
        return w * h.reshape(w.shape).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        if isinstance(self.inner, nn.Linear):
            return F.linear(x, w, self.inner.bias)
        return self.inner._conv_forward(x, w, self.inner.bias)


def convert_to_supermask(
    model: nn.Module,
    sparsity: float,
    *,
    granularity: str = "element",
    block_size: Optional[int] = None,
    filter: Optional[LayerFilter] = None,
    freeze_others: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Replace the selected Linear/Conv2d layers of ``model`` in place by :class:`SupermaskLayer` s.

    Each layer keeps ``round((1 − sparsity) · units)`` units.  With
    ``freeze_others`` every other parameter is frozen too, so only scores learn
    (edge-popup on a random network).  Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sparsity = check_sparsity("sparsity", sparsity)
    block_size = check_granularity(granularity, block_size)
    filt = default_filter if filter is None else filter
    g = torch.Generator().manual_seed(seed)
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and filt(n, m)]
    if not chosen:
        raise ValueError("filter selected no Linear or Conv2d layer of model")
    if freeze_others:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, module in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SupermaskLayer(module, 1.0 - sparsity, block_size, generator=g))
    return model


def supermask_layers(model: nn.Module) -> dict[str, SupermaskLayer]:
    """``name -> SupermaskLayer`` of every converted layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SupermaskLayer)}
