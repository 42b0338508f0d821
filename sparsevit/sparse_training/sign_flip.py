"""A binary optimiser for sign learning: Bop (Helwegen et al., "Latent Weights Do Not Exist",
NeurIPS 2019) applied to real-valued weights, which flips signs and never changes magnitudes
(stage 2 of Peek-a-Boo, Chen et al. ICLR 2022).

    m ← (1 − γ) · m + γ · g                      (g = ∂L/∂W, only kept entries; m starts at 0)
    W ← −W   where  |m| > τ  and  sign(m) = sign(W)

i.e. a weight flips when the averaged gradient ``m`` is strong enough and descending along it
(``W − η m``) would cross zero.  ``m`` is not reset by a flip.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

__all__ = ["SignFlipOptimizer", "check_gamma", "check_tau"]


def check_gamma(gamma: object) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a float in (0, 1], got {type(gamma).__name__}")
    gamma = float(gamma)
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    return gamma


def check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float > 0, got {type(tau).__name__}")
    tau = float(tau)
    if not (tau > 0.0) or math.isinf(tau):
        raise ValueError(f"tau must be a finite float > 0, got {tau}")
    return tau


class SignFlipOptimizer(torch.optim.Optimizer):
    """Bop (Helwegen et al. 2019) on real weights: flip signs, never change magnitudes.

    Per parameter, with ``g`` its gradient (masked entries: 0) and ``m`` starting at 0::

        m ← (1 − γ) · m + γ · g
        W ← −W   where  |m| > τ  and  sign(m) = sign(W)   (and the mask is True)

    Defaults ``gamma=1e-4``, ``tau=1e-8`` are Bop's (also larq's ``Bop`` defaults); the paper
    explores ``γ ∈ [1e-5, 1e-3]`` and ``τ ∈ [1e-8, 1e-6]`` for ±1 weights.  ``τ`` is compared with
    the raw gradient scale, so tune it to the model (see :class:`PeekABoo`).  ``gamma`` / ``tau``
    may also be set per param group.

    ``masks``: one bool tensor (the parameter's shape; ``True`` = kept) or ``None`` per parameter,
    in the order of the parameters over the groups, or a mapping ``param -> mask``;
    :meth:`set_mask` sets one later.  Masked entries get ``m = 0`` and never flip.  The masks are
    not part of :meth:`state_dict` (they come from the mask manager).

    ``last_flips``: number of weights flipped by the last :meth:`step`; ``total_flips``: since
    construction; ``state[p]["flips"]`` per parameter.
    """

    def __init__(self, params: Any, gamma: float = 1e-4, tau: float = 1e-8, *,
                 masks: Optional[Union[Sequence[Optional[torch.Tensor]], Mapping[torch.Tensor, torch.Tensor]]] = None):
        defaults = dict(gamma=check_gamma(gamma), tau=check_tau(tau))
        super().__init__(params, defaults)
        self._masks: dict[int, torch.Tensor] = {}
        self.last_flips = 0
        self.total_flips = 0
        plist = [p for group in self.param_groups for p in group["params"]]
        if masks is None:
            return
        if isinstance(masks, Mapping):
            held = {id(p) for p in plist}
            for p, m in masks.items():
                if not isinstance(p, torch.Tensor) or id(p) not in held:
                    raise ValueError("masks maps a tensor this optimizer does not hold")
                self.set_mask(p, m)
            return
        if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence):
            raise TypeError(f"masks must be a sequence of bool tensors (one per parameter) or a mapping "
                            f"param -> mask, got {type(masks).__name__}")
        if len(masks) != len(plist):
            raise ValueError(f"masks must hold one entry per parameter ({len(plist)}), got {len(masks)}")
        for p, m in zip(plist, masks):
            if m is not None:
                self.set_mask(p, m)

    def add_param_group(self, param_group: dict) -> None:
        if "gamma" in param_group:
            param_group["gamma"] = check_gamma(param_group["gamma"])
        if "tau" in param_group:
            param_group["tau"] = check_tau(param_group["tau"])
        super().add_param_group(param_group)

    def set_mask(self, param: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Flip only where ``mask`` (bool, ``param``'s shape) is True; ``None`` removes the mask."""
        if not any(p is param for group in self.param_groups for p in group["params"]):
            raise ValueError("param is not held by this optimizer")
        if mask is None:
            self._masks.pop(id(param), None)
            return
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"a mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"a mask must have its parameter's shape {tuple(param.shape)}, got {tuple(mask.shape)}")
        self._masks[id(param)] = mask.to(param.device)

    def mask_of(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The mask of ``param`` (``None``: every entry may flip)."""
        return self._masks.get(id(param))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):  # type: ignore[override]
        """One Bop step (see the class docstring); returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flips = 0
        for group in self.param_groups:
            gamma, tau = group["gamma"], group["tau"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SignFlipOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["flips"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                m.mul_(1.0 - gamma).add_(p.grad, alpha=gamma)
                mask = self._masks.get(id(p))
                if mask is not None:
                    m.masked_fill_(~mask, 0)
                flip = (m.abs() > tau) & (torch.sign(m) == torch.sign(p))
                if mask is not None:
                    flip &= mask
                p.copy_(torch.where(flip, -p, p))
                n = int(flip.sum())
                state["step"] += 1
                state["flips"] += n
                flips += n
        self.last_flips = flips
        self.total_flips += flips
        return loss
