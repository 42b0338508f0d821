"""Dual Lottery Ticket Hypothesis: Random Sparse Network Transformation (RST; Bai et al., "Dual
Lottery Ticket Hypothesis", ICLR 2022).

A *random* sparse mask ``M`` (uniform or ERK layer densities, element or ``b × b`` block units,
drawn from a seeded CPU generator) is fixed at the start; the network is trained **dense**,
with an L2 penalty on the weights that ``M`` will remove, whose coefficient grows:

    L_t(W) = L(W) + (λ_t / 2) · Σ_l ‖W_l ⊙ (1 − M_l)‖²,   i.e.   g ← g + λ_t · W ⊙ (1 − M)
    λ_t = min(λ_max, λ_0 + η · ⌊t / k⌋)                    (t = optimizer steps so far)

so the penalised weights are driven towards zero while the kept ones take over their role.
After ``penalty_steps`` steps (or at :meth:`RandomSparseTransformation.finalize`) the
penalised weights are removed: ``W ← W ⊙ M`` exactly, and from then on the
:class:`~sparsevit.sparse_training.MaskManager` keeps them at zero (masked gradients, masks
re-applied after every optimizer step) while the sparse network trains on.  With block units
the result converts with :func:`~sparsevit.sparse_training.to_block_sparse`.

The penalty is added to the gradient by a tensor hook on each weight, once per backward pass
(as if every backward's loss carried the term); under DistributedDataParallel every rank adds
the same ``λ_t · W ⊙ (1 − M)`` before the all-reduce, so the mean gradient carries it once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..ops.validation import check_int
from .density import check_sparsity
from .masks import LayerFilter, MaskManager, _comm_device, reset_optimizer_state, topk_mask

__all__ = ["RandomSparseTransformation", "rst_lambda"]

DISTRIBUTIONS = ("uniform", "erk")
STATE_FORMAT = "sparsevit-rst-1"


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_schedule(lambda_init: object, lambda_step: object, lambda_every: object,
                   lambda_max: object) -> tuple[float, float, int, float]:
    """The λ schedule's arguments, checked: ``λ_0 ≥ 0``, ``η ≥ 0``, ``k ≥ 1``, ``λ_max ≥ λ_0``."""
    lam0 = _real("lambda_init", lambda_init)
    eta = _real("lambda_step", lambda_step)
    k = check_int("lambda_every", lambda_every, 1)
    lam_max = _real("lambda_max", lambda_max)
    if lam0 < 0:
        raise ValueError(f"lambda_init must be >= 0, got {lam0}")
    if eta < 0:
        raise ValueError(f"lambda_step (the growth η of λ every lambda_every steps) must be >= 0, got {eta}")
    if lam_max < lam0:
        raise ValueError(f"lambda_max must be >= lambda_init ({lam0}), got {lam_max}")
    return lam0, eta, k, lam_max


def rst_lambda(step: int, lambda_init: float = 0.0, lambda_step: float = 1e-4, lambda_every: int = 5,
               lambda_max: float = 1.0) -> float:
    """The RST penalty coefficient after ``step`` optimizer steps: ``min(λ_max, λ_0 + η · ⌊step / k⌋)``."""
    schedule = check_schedule(lambda_init, lambda_step, lambda_every, lambda_max)
    return _lambda_at(check_int("step", step, 0), schedule)


def _lambda_at(step: int, schedule: tuple[float, float, int, float]) -> float:
    """``min(λ_max, λ_0 + η · ⌊step / k⌋)`` for a checked ``schedule = (λ_0, η, k, λ_max)``."""
    lam0, eta, k, lam_max = schedule
    return min(lam_max, lam0 + eta * (step // k))


class RandomSparseTransformation:
    """RST on ``model`` (in place): a random target mask, a growing L2 penalty outside it, then removal.

    Args:
        model: the dense, randomly initialised network.
        sparsity: the share of units removed at the end, in ``[0, 1)``, spread over the layers by
            ``distribution`` (``"uniform"`` or ``"erk"``).
        granularity / block_size: ``"element"`` or ``"block"`` units of ``b × b``.
        filter / filter_fn: the sparsified layers, as in :class:`MaskManager`.
        lambda_init, lambda_step, lambda_every, lambda_max: the schedule
            ``λ_t = min(λ_max, λ_0 + η · ⌊t / k⌋)`` (:func:`rst_lambda`); ``η < 0`` is a ValueError.
        penalty_steps: after this many :meth:`step` calls the penalised weights are removed
            (:meth:`finalize`); ``None``: only when :meth:`finalize` is called.
        seed: the generator of the random masks (the same on every rank; under torch.distributed
            the masks are also broadcast from rank 0).
        optimizer: attach now (see :meth:`attach`).

    Use: ``rst.attach(opt)``, then after every ``opt.step()`` call ``rst.step()`` (or pass
    ``rst.on_step`` to :func:`~sparsevit.sparse_training.fit`).  :attr:`manager` is the mask
    manager (all-ones masks while the penalty phase runs, ``M`` after removal);
    :attr:`target_masks` the random unit masks ``M``.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        distribution: str = "uniform",
        granularity: str = "element",
        block_size: Optional[int] = None,
        filter: Optional[LayerFilter] = None,
        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
        lambda_init: float = 0.0,
        lambda_step: float = 1e-4,
        lambda_every: int = 5,
        lambda_max: float = 1.0,
        penalty_steps: Optional[int] = None,
        seed: int = 0,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.sparsity = check_sparsity("sparsity", sparsity)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.schedule = check_schedule(lambda_init, lambda_step, lambda_every, lambda_max)
        self.penalty_steps = None if penalty_steps is None else check_int("penalty_steps", penalty_steps, 0)
        self.distribution = distribution
        self.model = model
        self.manager = MaskManager(model, self.sparsity, distribution=distribution, granularity=granularity,
                                   block_size=block_size, filter=filter, filter_fn=filter_fn, init="dense", seed=seed)
        if self.manager.sharded:
            self.manager.remove()
            raise ValueError("RandomSparseTransformation does not support FSDP2-sharded weights: run it unsharded "
                             "or under DistributedDataParallel")
        self.target_masks = self._draw_masks()
        self.steps = 0
        self.finalized = False
        self._penalty_hooks: list[Any] = []
        self._install_penalty()
        if optimizer is not None:
            self.attach(optimizer)
        if self.penalty_steps == 0:
            self.finalize()

    # ------------------------------------------------------------------ masks
    def _draw_masks(self) -> dict[str, torch.Tensor]:
        """Uniformly random unit masks with the manager's exact per-layer counts (broadcast from rank 0)."""
        out = {}
        for name, layer in self.manager.layers.items():
            scores = torch.rand(layer.num_units, generator=self.manager.generator)
            out[name] = topk_mask(scores, self.manager.target_active(name)).reshape(layer.local_unit_shape)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for name, mask in out.items():
                buf = mask.to(torch.uint8).to(_comm_device(mask))
                dist.broadcast(buf, src=0)
                out[name] = buf.cpu().to(torch.bool)
        return out

    def _element_target(self, name: str) -> torch.Tensor:
        """``M`` of layer ``name`` expanded to the weight's shape, on the weight's device."""
        layer = self.manager.layers[name]
        return layer.expand(self.target_masks[name].to(layer.weight.device))

    # ---------------------------------------------------------------- penalty
    @property
    def penalty(self) -> float:
        """``λ_t`` now (0 once the penalised weights are removed)."""
        return 0.0 if self.finalized else _lambda_at(self.steps, self.schedule)

    def _install_penalty(self) -> None:
        self._remove_penalty()
        for name, layer in self.manager.layers.items():
            outside = ~self._element_target(name)
            weight = layer.weight

            def hook(grad: torch.Tensor, weight: torch.Tensor = weight, outside: torch.Tensor = outside) -> torch.Tensor:
                lam = self.penalty
                if lam == 0.0:
                    return grad
                return grad + lam * (weight.detach() * outside).to(grad.dtype)

            self._penalty_hooks.append(weight.register_hook(hook))

    def _remove_penalty(self) -> None:
        for h in self._penalty_hooks:
            h.remove()
        self._penalty_hooks = []

    @torch.no_grad()
    def penalised_norm(self) -> float:
        """``‖W ⊙ (1 − M)‖₂`` over all sparsified layers: how far the weights to remove still are from zero."""
        total = 0.0
        for name, layer in self.manager.layers.items():
            w = layer.weight.detach()
            total += float((w.double() * (~self._element_target(name))).pow(2).sum())
        return math.sqrt(total)

    # ---------------------------------------------------------------- driving
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every ``optimizer.step()`` (a no-op on the weights until removal)."""
        self.manager.attach(optimizer)

    def step(self) -> None:
        """Call after every optimizer step: advances ``t`` (and λ); removes the weights at ``t = penalty_steps``."""
        self.steps += 1
        if not self.finalized and self.penalty_steps is not None and self.steps >= self.penalty_steps:
            self.finalize()

    def on_step(self, step: int) -> None:
        """:func:`~sparsevit.sparse_training.fit`'s ``on_step`` callback: the same as :meth:`step`."""
        self.step()

    @torch.no_grad()
    def finalize(self) -> None:
        """Remove the penalised weights: ``W ← W ⊙ M`` and the manager keeps them at exactly zero from now on.

        The optimizer state of the removed weights (moments, momentum) is zeroed too.  Idempotent.
        """
        if self.finalized:
            return
        self._remove_penalty()
        for name, layer in self.manager.layers.items():
            layer.local_mask = self.target_masks[name].clone()
        self.manager.apply_masks()
        if self.manager.optimizer is not None:
            for layer in self.manager:
                reset_optimizer_state(self.manager.optimizer, layer.weight, ~layer.element_mask)
        self.finalized = True

    # ------------------------------------------------------------- reporting
    def masks(self) -> dict[str, torch.Tensor]:
        """``name -> unit mask`` ``M`` (the target; the weights outside are zero once finalized)."""
        return {n: m.clone() for n, m in self.target_masks.items()}

    def total_sparsity(self) -> float:
        """``1 − Σ M / Σ numel`` of the target masks over the sparsified layers."""
        kept = sum(int(self._element_target(n).sum()) for n in self.target_masks)
        total = sum(l.weight.numel() for l in self.manager)
        return 1.0 - kept / total

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Steps, the phase, the target masks, the schedule and the manager's state (masks, generator)."""
        lam0, eta, k, lam_max = self.schedule
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "finalized": self.finalized,
            "target_masks": self.masks(),
            "schedule": {"lambda_init": lam0, "lambda_step": eta, "lambda_every": k, "lambda_max": lam_max},
            "penalty_steps": self.penalty_steps,
            "manager": self.manager.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict` (load the model's and optimizer's own states as usual).

        Everything is checked before anything changes; a bad state is a ValueError / TypeError.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state is not a RandomSparseTransformation state (format {state.get('format')!r})")
        for key in ("steps", "finalized", "target_masks", "schedule", "penalty_steps", "manager"):
            if key not in state:
                raise ValueError(f"state lacks the key {key!r}")
        steps = check_int("state steps", state["steps"], 0)
        if not isinstance(state["finalized"], bool):
            raise ValueError(f"state finalized must be a bool, got {state['finalized']!r}")
        sched = state["schedule"]
        if not isinstance(sched, Mapping):
            raise ValueError("state schedule must be a mapping")
        schedule = check_schedule(sched.get("lambda_init"), sched.get("lambda_step"), sched.get("lambda_every"),
                                  sched.get("lambda_max"))
        penalty_steps = state["penalty_steps"]
        if penalty_steps is not None:
            penalty_steps = check_int("state penalty_steps", penalty_steps, 0)
        targets = self.manager.check_masks(state["target_masks"], "state target_masks")
        manager_state = self.manager.check_state(state["manager"])
        target = {n: c[0].cpu().to(torch.bool).reshape(self.manager.layers[n].local_unit_shape)
                  for n, c in targets.items()}
        if state["finalized"]:
            for n, c in manager_state["masks"].items():
                if not torch.equal(c[0].cpu().reshape(target[n].shape), target[n]):
                    raise ValueError(f"state: the finalized manager mask of {n!r} differs from its target mask")
        # commit
        self.schedule, self.penalty_steps, self.steps = schedule, penalty_steps, steps
        self.target_masks = target
        self.manager._commit_state(manager_state)
        self.finalized = state["finalized"]
        if self.finalized:
            self._remove_penalty()
        else:
            self._install_penalty()
