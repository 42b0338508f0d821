"""Lottery tickets by iterative magnitude pruning with rewinding (Frankle & Carbin, ICLR 2019;
rewinding: Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020).

IMP, with survivors ``S_r`` (the mask after round ``r``, ``S_0`` = everything):

1. keep ``θ_k`` (``k = 0``: the initialisation; ``k > 0``: the weights after k steps);
2. train;
3. prune the fraction ``p`` of the surviving units of smallest ``|W|`` (pooled per
   block), ranked within each layer (``scope="layer"``) or across all sparsified
   layers (``scope="global"``), so after ``r`` rounds the density is ``(1 − p)^r``
   (up to rounding);
4. rewind: ``W ← θ_k ⊙ M`` (every other parameter back to ``θ_k`` as well);
5. repeat from 2.

The random-reinitialisation control trains the same mask from fresh weights
(each sparsified layer drawn from ``N(0, σ_l²)``, ``σ_l`` the std of ``θ_k`` of that
layer).  Every round's masks and metrics are kept.  Users drive the rounds from
their own loop (``on_step``, ``prune``, ``rewind``) or call :meth:`run`.

FSDP2 (``fully_shard``): pruning is an exact top-k across the shards (global scope:
one ranking over every layer's units, which must then all be sharded), and
``random_reinit`` draws the whole weight on every rank and keeps its rows, with σ_l
from all-reduced moments, so tickets equal the single-process ones.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .masks import LayerFilter, MaskManager
from .sharding import global_std, lexicographic_order, sharded_topk_indexed
from .tickets import save_ticket

__all__ = ["LotteryTicket"]

logger = logging.getLogger("sparsevit.sparse_training")

SCOPES = ("global", "layer")


class LotteryTicket:
    """Iterative magnitude pruning with rewinding to ``θ_k`` (see the module docstring).

    ``prune_fraction`` ``p`` in (0, 1): the share of surviving units removed per round.
    ``rewind_step`` ``k``: 0 keeps ``θ_0`` now; ``k > 0`` keeps the weights when
    :meth:`on_step` is called with ``k`` during the first round.
    """

    def __init__(
        self,
        model: nn.Module,
        prune_fraction: float = 0.2,
        *,
        scope: str = "global",
        granularity: str = "element",
        block_size: Optional[int] = None,
        rewind_step: int = 0,
        filter: Optional[LayerFilter] = None,
        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    ):
        if isinstance(prune_fraction, bool) or not isinstance(prune_fraction, (int, float)):
            raise TypeError(f"prune_fraction must be a float in (0, 1), got {type(prune_fraction).__name__}")
        if not (0.0 < float(prune_fraction) < 1.0):
            raise ValueError(f"prune_fraction must lie in (0, 1), got {prune_fraction}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ValueError(f"rewind_step must be an int >= 0, got {rewind_step!r}")
        self.model = model
        self.prune_fraction = float(prune_fraction)
        self.scope = scope
        self.rewind_step = rewind_step
        self.manager = MaskManager(
            model, 0.0, distribution="uniform", granularity=granularity, block_size=block_size, filter=filter,
            filter_fn=filter_fn, init="dense"
        )
        self.rewind_state: Optional[dict[str, torch.Tensor]] = None
        self.history: list[dict[str, Any]] = []
        self._new_round_record()
        if rewind_step == 0:
            self.save_rewind_point()

    # ------------------------------------------------------------ callbacks
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep masked weights at zero under ``optimizer`` (call for each round's new optimizer)."""
        self.manager.attach(optimizer)

    def on_step(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based) of each round: keeps ``θ_k`` at ``step == k`` in round 0."""
        if self.rewind_state is None and step == self.rewind_step:
            self.save_rewind_point()

    def save_rewind_point(self) -> None:
        """Keep a copy of the whole model state as ``θ_k``."""
        self.rewind_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # --------------------------------------------------------------- rounds
    @property
    def round(self) -> int:
        return len(self.history) - 1

    def _new_round_record(self) -> None:
        self.history.append({
            "round": len(self.history),
            "sparsity": self.manager.total_sparsity(),
            "layer_sparsity": self.manager.layer_sparsity(),
            "masks": {n: m.detach().cpu().clone() for n, m in self.manager.masks().items()},
            "metrics": {},
        })

    def record(self, **metrics: float) -> None:
        """Add metrics (accuracy, loss, ...) to the current round's record."""
        self.history[-1]["metrics"].update(metrics)

    @torch.no_grad()
    def prune(self) -> float:
        """Remove the fraction ``p`` of surviving units of smallest pooled ``|W|``; returns the new total sparsity.

        Per layer (``scope="layer"``) or over all layers (``"global"``), the ``round(p · n)``
        surviving units of smallest score go, ties highest index first (so the ``n − round(p n)``
        kept are the top ones, ties lowest index first).  Under FSDP2 the selection is exact
        across shards (:func:`~.sharding.sharded_topk_indexed`).
        """
        layers = self.manager.layers
        n_active = self.manager.active_counts()
        # Survivors scored by pooled |W|; the pruned ones score +inf and are never chosen again.
        scores = {}
        for n, l in layers.items():
            inf = torch.tensor(float("inf"), device=l.local_mask.device)
            scores[n] = torch.where(l.local_mask.flatten(), l.pool(l.local_weight()).flatten(), inf)
        if self.scope == "layer":
            for name, layer in layers.items():
                pruned = int(round(self.prune_fraction * n_active[name]))
                drop = layer.top_units(scores[name], pruned, largest=False, low_index_first=False)
                layer.local_mask = layer.local_mask & ~drop
        else:
            self._prune_global(scores, sum(n_active.values()))
        self.manager.sync_masks()
        self.manager.apply_masks()
        self._new_round_record()
        return self.manager.total_sparsity()

    def _prune_global(self, scores: Mapping[str, torch.Tensor], n_active: int) -> None:
        """Global scope: one ranking over every layer's units, indexed in layer order (layer base + unit index)."""
        layers = self.manager.layers
        sharded = [layer.shard is not None for layer in layers.values()]
        if any(sharded) and not all(sharded):
            plain = [n for n, l in layers.items() if l.shard is None]
            raise ValueError(f"scope='global' needs every sparsified layer sharded by fully_shard or none; {plain} "
                             "are not: shard the whole model, or use scope='layer'")
        pruned = int(round(self.prune_fraction * n_active))
        base, index = 0, []
        for layer in layers.values():
            n_local = layer.local_mask.numel()
            index.append(torch.arange(n_local, dtype=torch.int64) + base + layer.unit_offset)
            base += layer.num_units
        flat = torch.cat([scores[n].float().cpu() for n in layers])
        index = torch.cat(index)
        if all(sharded):
            drop = sharded_topk_indexed(flat, index, pruned, base, self.manager.shard_group, largest=False,
                                        low_index_first=False, stats=self.manager.comm)
        else:
            order = lexicographic_order(flat, index, largest=False, low_index_first=False)[:pruned]
            drop = torch.zeros(flat.numel(), dtype=torch.bool)
            drop[order] = True
        offset = 0
        for layer in layers.values():
            n_local = layer.local_mask.numel()
            part = drop[offset: offset + n_local].reshape(layer.local_unit_shape).to(layer.local_mask.device)
            layer.local_mask = layer.local_mask & ~part
            offset += n_local

    @torch.no_grad()
    def rewind(self) -> None:
        """``W ← θ_k ⊙ M`` for the sparsified layers, every other parameter and buffer back to ``θ_k``."""
        if self.rewind_state is None:
            raise RuntimeError(f"no rewind point: on_step({self.rewind_step}) was never called in round 0")
        self.model.load_state_dict(self.rewind_state)
        self.manager.apply_masks()

    @torch.no_grad()
    def random_reinit(self, seed: int = 0) -> None:
        """The control: rewind, then redraw every sparsified weight from ``N(0, σ_l²)`` (σ_l: std of ``θ_k``), masked."""
        self.rewind()
        g = torch.Generator().manual_seed(seed)
        for name, layer in self.manager.layers.items():
            ref = self.rewind_state[f"{name}.weight"] if f"{name}.weight" in self.rewind_state else layer.weight
            sigma = global_std(ref, layer.shard, self.manager.comm)
            w = torch.randn(layer.shape, generator=g) * sigma  # whole on every rank: the same draw as one process
            local = layer.local_weight()
            start = layer.shard.row_start if layer.shard is not None else 0
            local.copy_(w[start: start + local.shape[0]].to(local))
        self.manager.apply_masks()

    def masks(self) -> dict[str, torch.Tensor]:
        """The current masks (the ticket), ``name -> unit mask``."""
        return self.manager.masks()

    def save(self, path: str) -> str:
        """Save the current ticket as a file (:func:`~sparsevit.sparse_training.tickets.save_ticket`)."""
        meta = {
            "round": str(self.round),
            "scope": self.scope,
            "granularity": self.manager.granularity,
            "block_size": str(self.manager.block_size),
            "sparsity": repr(self.manager.total_sparsity()),
        }
        return save_ticket(path, self.masks(), meta)

    def load_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Install given masks (e.g. from :func:`load_ticket`) and zero the masked weights.

        ``masks`` must hold exactly the managed layers (unknown and missing names are a
        ValueError listing the valid ones), each a bool mask of the layer's unit shape;
        everything is checked before any mask or weight changes.
        """
        checked = self.manager.check_masks(masks)
        self.manager._install_masks(checked)
        self.manager.apply_masks()

    def run(self, train: Callable[[nn.Module, "LotteryTicket"], Mapping[str, float]], rounds: int,
            progress: Optional[Callable[[int, int, dict], None]] = None) -> list[dict]:
        """The built-in IMP loop: ``rounds + 1`` trainings, pruning and rewinding in between.

        ``train(model, ticket)`` trains one round (calling ``ticket.attach(opt)`` and
        ``ticket.on_step(t)``) and returns its metrics, recorded per round.  After each
        round, ``progress(round, rounds + 1, record)`` (if given) is called and the round
        is logged at INFO level on the ``sparsevit.sparse_training`` logger.
        """
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable (round, total, record), got {type(progress).__name__}")
        for r in range(rounds + 1):
            self.record(**train(self.model, self))
            record = self.history[-1]
            logger.info("LotteryTicket round %d/%d: sparsity %.4f, metrics %s", r + 1, rounds + 1,
                        self.manager.total_sparsity(), record.get("metrics", {}))
            if progress is not None:
                progress(r + 1, rounds + 1, dict(record))
            if r < rounds:
                self.prune()
                self.rewind()
        return self.history

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Masks, θ_k and the per-round history."""
        return {
            "manager": self.manager.state_dict(),
            "rewind_state": None if self.rewind_state is None else {k: v.cpu() for k, v in self.rewind_state.items()},
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore masks, θ_k and the history; everything is checked first, a refused state changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
        for key in ("manager", "rewind_state", "history"):
            if key not in state:
                raise ValueError(f"state lacks the key {key!r} (not a LotteryTicket.state_dict())")
        rs = state["rewind_state"]
        if rs is not None and not (
            isinstance(rs, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in rs.items())
        ):
            raise ValueError("state rewind_state must be None or a mapping name -> tensor (a model state_dict)")
        history = state["history"]
        if not isinstance(history, (list, tuple)) or not history or not all(isinstance(h, Mapping) for h in history):
            raise ValueError("state history must be a non-empty list of per-round dicts")
        checked = self.manager.check_state(state["manager"])
        new_rewind = None if rs is None else {k: v.clone() for k, v in rs.items()}
        new_history = copy.deepcopy(list(history))
        self.manager._commit_state(checked)
        self.rewind_state = new_rewind
        self.history = new_history
