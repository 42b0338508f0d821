"""Peek-a-Boo (PaB): prune a random network at initialisation, then learn only the signs of the
kept weights (Chen et al., "Peek-a-Boo: What (More) is Disguised in a Randomly Weighted Neural
Network, and How to Find It Efficiently", ICLR 2022).

**Stage 1 -- pruning at initialisation** (:mod:`.pruning_at_init`): every sparsified weight
gets a score -- ``|W|`` (magnitude), ``|W ⊙ Σ_b ∂L_b/∂W|`` (SNIP) or ``|W ⊙ ∂R/∂W|`` with
``R = 1ᵀ(Π_l|W_l|)1`` (SynFlow) -- and the units of largest score are kept, in one shot or
over ``n`` rounds keeping ``(1 − sparsity)^{k/n}`` of the units in round ``k``.

**Stage 2 -- sign learning.**  The kept weights keep their random magnitudes ``|W|``; only their
signs change, by the binary optimiser Bop (Helwegen et al., "Latent Weights Do Not Exist",
NeurIPS 2019) applied to the real-valued weights:

    m ← (1 − γ) · m + γ · g                      (g = ∂L/∂W, only kept entries; m starts at 0)
    W ← −W   where  |m| > τ  and  sign(m) = sign(W)

i.e. a weight flips when the averaged gradient ``m`` is strong enough and descending along it
(``W − η m``) would cross zero.  ``m`` is not reset by a flip.  Pruned weights stay exactly zero
and the kept set never changes, so ``|W|`` and the mask after training equal those after stage
1 bit for bit.  Every other parameter (biases, norms, embeddings, the head and the stem) is
frozen by default; ``PeekABoo(train_others=True)`` trains those that were trainable with AdamW
(``others_lr``) alongside the signs, which is no longer "only signs".
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .loop import minibatches
from .masks import LayerFilter
from .pruning_at_init import Data, LossFn, prune_at_init
from .sign_flip import SignFlipOptimizer, check_gamma, check_tau

__all__ = ["PeekABoo"]


class PeekABoo:
    """Peek-a-Boo on ``model`` (in place): stage 1 on construction, stage 2 by :meth:`fit`.

    Construction runs :func:`prune_at_init` (``score``, ``data``, ``iterations``, ``scope``,
    ``granularity`` / ``block_size``, ``filter`` / ``filter_fn``, ``input_shape``, ``loss_fn``; its
    wall time is :attr:`prune_s`), keeps :attr:`manager`, and freezes every parameter but the
    sparsified weights.  :meth:`optimizer` is a :class:`SignFlipOptimizer` (``gamma``, ``tau``)
    over those weights with their masks (the manager attached), for a custom loop; :meth:`fit`
    is the built-in loop.  ``train_others=True`` keeps the other trainable parameters (biases,
    norms, embeddings, head) trainable, stepped by AdamW with ``others_lr``.

    Signs only move: ``|W|`` and the masks stay as after stage 1 (:attr:`magnitudes`).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        score: str = "magnitude",
        data: Optional[Data] = None,
        iterations: Optional[int] = None,
        scope: str = "global",
        granularity: str = "element",
        block_size: Optional[int] = None,
        filter: Optional[LayerFilter] = None,
        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
        input_shape: Optional[Sequence[int]] = None,
        loss_fn: Optional[LossFn] = None,
        gamma: float = 1e-4,
        tau: float = 1e-8,
        train_others: bool = False,
        others_lr: float = 1e-3,
    ):
        self.gamma = check_gamma(gamma)
        self.tau = check_tau(tau)
        if not isinstance(train_others, bool):
            raise TypeError(f"train_others must be a bool, got {type(train_others).__name__}")
        if isinstance(others_lr, bool) or not isinstance(others_lr, (int, float)) or not others_lr > 0:
            raise ValueError(f"others_lr must be a float > 0, got {others_lr!r}")
        self.model = model
        self.score = score
        self.train_others = train_others
        self.others_lr = float(others_lr)
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        t0 = time.perf_counter()
        self.manager = prune_at_init(model, sparsity, score=score, data=data, iterations=iterations, scope=scope,
                                     granularity=granularity, block_size=block_size, filter=filter,
                                     filter_fn=filter_fn, input_shape=input_shape, loss_fn=loss_fn)
        self.prune_s = time.perf_counter() - t0
        sparse = {id(l.weight) for l in self.manager}
        for p in model.parameters():
            if id(p) not in sparse:
                p.requires_grad_(bool(train_others and p.requires_grad))
        with torch.no_grad():
            self.magnitudes = {n: l.weight.detach().abs().clone() for n, l in self.manager.layers.items()}
            self.initial_signs = {n: torch.sign(l.weight.detach()).clone() for n, l in self.manager.layers.items()}
        self.history: list[dict[str, float]] = []
        self._opt: Optional[SignFlipOptimizer] = None

    def optimizer(self) -> SignFlipOptimizer:
        """The sign optimiser over the sparsified weights, flipping only kept entries (one per instance)."""
        if self._opt is None:
            layers = list(self.manager)
            self._opt = SignFlipOptimizer([l.weight for l in layers], self.gamma, self.tau,
                                          masks=[l.element_mask for l in layers])
            self.manager.attach(self._opt)
        return self._opt

    def others_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """AdamW over the other trainable parameters (``train_others=True``), else ``None``."""
        if not self.train_others:
            return None
        sparse = {id(l.weight) for l in self.manager}
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in sparse]
        return torch.optim.AdamW(params, lr=self.others_lr) if params else None

    def fit(self, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int = 64, seed: int = 0,
            on_step: Optional[Callable[[int], None]] = None) -> float:
        """Train the signs for ``steps`` mini-batches of ``(x, y)``; returns the mean loss of the last 10 steps.

        Mini-batches are drawn as in :func:`~sparsevit.sparse_training.fit` (the same order for the
        same ``seed``); ``L = loss_fn(model(x_B), y_B)``.  Each step appends ``{"step", "loss",
        "flips"}`` to :attr:`history`.
        """
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be torch.Tensors")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
        for name, v in (("steps", steps), ("batch_size", batch_size), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        opt = self.optimizer()
        others = self.others_optimizer()
        self.model.train()
        losses: list[float] = []
        done = len(self.history)
        for t, idx in enumerate(minibatches(x.shape[0], batch_size, steps, seed), start=1):
            opt.zero_grad(set_to_none=True)
            if others is not None:
                others.zero_grad(set_to_none=True)
            loss = self.loss_fn(self.model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if others is not None:
                others.step()
            losses.append(float(loss.detach()))
            self.history.append({"step": done + t, "loss": losses[-1], "flips": opt.last_flips})
            if on_step is not None:
                on_step(t)
        return sum(losses[-10:]) / max(1, len(losses[-10:]))

    @property
    def total_flips(self) -> int:
        """Sign flips applied so far (a weight flipped twice counts twice)."""
        return 0 if self._opt is None else self._opt.total_flips

    @torch.no_grad()
    def flipped_fraction(self) -> float:
        """Share of the kept weights whose sign now differs from the sign after stage 1."""
        changed = kept = 0
        for name, layer in self.manager.layers.items():
            m = layer.element_mask
            changed += int((torch.sign(layer.weight.detach()) != self.initial_signs[name])[m].sum())
            kept += int(m.sum())
        return changed / max(1, kept)

    def masks(self) -> dict[str, torch.Tensor]:
        """``name -> unit mask`` (the kept set, fixed after stage 1)."""
        return self.manager.masks()

    def sparsity(self) -> float:
        """``1 − Σ M / Σ numel`` over the sparsified layers."""
        return self.manager.total_sparsity()
