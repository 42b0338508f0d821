"""RigL, SET and static sparse training (Evci et al., "Rigging the Lottery", ICML 2020, Alg. 1).

Every ``delta_t`` steps ``t`` with ``t < t_end``, in every sparsified layer with
``n`` active units (elements or ``b × b`` blocks):

    f(t) = (α / 2) · (1 + cos(π t / t_end))                  (cosine drop fraction, eq. 1)
    k    = ⌊f(t) · n⌋
    drop: the k active units of smallest |W|                   (pooled per block)
    grow: the k units, inactive after the drop, of largest |∂L/∂W|  (RigL, dense gradient)
          or chosen uniformly at random                        (SET, Mocanu et al. 2018)

so every layer keeps exactly ``n`` active units.  Newly grown weights are set to
0 (the loss does not move) and every per-parameter optimizer state of theirs
(SGD momentum, Adam/AdamW first and second moments, ...) is zeroed.  Static
sparse training keeps the initial random mask.

Usage, one call per training step::

    rigl = RigL(model, optimizer, sparsity=0.9, delta_t=100, t_end=int(0.75 * steps))
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()   # masked grads; the dense grad is kept on update steps only
        optimizer.step()                  # the masks are re-applied right after
        rigl.step()                       # drop / grow on update steps

Departure from the paper's code: the update happens after the optimizer step
of its iteration (with that step's dense gradient) rather than replacing it,
so grown weights are exactly zero when ``step()`` returns.

Distributed data parallel: dense gradients are all-reduced (mean) before they
score growth, SET draws from a generator seeded identically on every rank, and
new masks are broadcast from rank 0, so all ranks hold the same masks.

FSDP2 (``fully_shard``, build the trainer after sharding): each rank scores only its
rows (its shard of ``|W|``, of FSDP2's reduce-scattered dense gradient, or of the whole
random draw for SET) and the drop and grow selections are exact top-k across shards
(:func:`~sparsevit.sparse_training.sharding.sharded_topk_mask`), so the masks equal the
single-process run's.  Each record in ``history`` then carries ``comm``: the
collectives and bytes this rank sent for the update.

Layers without a gradient: frozen weights are left out by the default filter
(see :class:`~sparsevit.sparse_training.masks.MaskManager`).  A sparsified layer
that received no gradient on an update step (not used in that forward pass) is
scored with a zero gradient, the way SET scores every layer without one: it still
drops its ``k`` smallest ``|W|`` and regrows ``k`` units (ties: lowest index first,
the same on every rank), all at zero, and a UserWarning names it the first time.
When no layer received a gradient, backward was not called: that is an error.

Progress: every mask update is a record in ``history`` (step, drop fraction, units
dropped per layer, weights regrown, total sparsity), is logged at INFO level on the
``sparsevit.sparse_training`` logger (per-layer sparsity at DEBUG), and is passed to
``callback(record)`` when one is given.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .density import Distribution, check_sparsity
from .masks import LayerFilter, MaskManager, check_granularity, reset_optimizer_state
from .sharding import all_reduce_sum

logger = logging.getLogger("sparsevit.sparse_training")

__all__ = ["DynamicSparseTraining", "RigL", "SET", "StaticSparse", "cosine_drop_fraction"]


def cosine_drop_fraction(t: int, t_end: int, alpha: float) -> float:
    """``f(t) = (α / 2) · (1 + cos(π t / t_end))``, and 0 from ``t_end`` on."""
    if t >= t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _state_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"state {name} must be an int >= {low}, got {value!r}")
    return int(value)


class DynamicSparseTraining:
    """The machinery RigL, SET and static sparse training share (see the module docstring).

    ``grow``: ``"gradient"`` (RigL), ``"random"`` (SET) or ``None`` (static).
    ``filter`` / ``filter_fn`` choose the layers (:mod:`sparsevit.layer_filters`);
    ``callback(record)`` is called after every mask update with its ``history`` record.
    """

    grow: Optional[str] = None

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float,
        *,
        delta_t: int = 100,
        t_end: Optional[int] = None,
        alpha: float = 0.3,
        distribution: Distribution = "erk",
        granularity: str = "element",
        block_size: Optional[int] = None,
        filter: Optional[LayerFilter] = None,
        seed: int = 0,
        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
        callback: Optional[Callable[[dict], None]] = None,
    ):
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a callable taking the update's record, got {type(callback).__name__}")
        self.callback = callback
        self._check_arguments(model, optimizer, sparsity, delta_t, t_end, alpha, granularity, block_size, seed)
        self.delta_t = int(delta_t)
        self.t_end = int(t_end) if self.grow is not None else 0
        self.alpha = float(alpha)
        self.manager = MaskManager(
            model,
            sparsity,
            distribution=distribution,
            granularity=granularity,
            block_size=block_size,
            filter=filter,
            filter_fn=filter_fn,
            init="random",
            seed=seed,
            optimizer=optimizer,
        )
        self.model = model
        self.optimizer = optimizer
        self.t = 0
        self.history: list[dict] = []
        self._warned_no_grad: set[str] = set()
        self.manager.collect_dense_grads = self.needs_dense_grad()

    # --------------------------------------------------------------- schedule
    def is_update_step(self, t: int) -> bool:
        """True when step ``t`` (1-based) updates the masks: ``t mod ΔT = 0`` and ``t < t_end``."""
        return self.grow is not None and t > 0 and t % self.delta_t == 0 and t < self.t_end

    def drop_fraction(self, t: int) -> float:
        """``f(t)`` of the module docstring."""
        return cosine_drop_fraction(t, self.t_end, self.alpha) if self.grow is not None else 0.0

    def needs_dense_grad(self) -> bool:
        """Whether the coming backward pass (of step ``t + 1``) must keep the dense gradient."""
        return self.grow == "gradient" and self.is_update_step(self.t + 1)

    def _check_arguments(self, model: object, optimizer: object, sparsity: object, delta_t: object, t_end: object,
                         alpha: object, granularity: object, block_size: object, seed: object) -> None:
        """Check the arguments in signature order and report every problem at once.

        Raises the exception type of the first problem (TypeError or ValueError), its
        message listing all of them.
        """
        def optimizer_ok() -> None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")

        def model_ok() -> None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

        def t_end_ok() -> None:
            if self.grow is None:
                return
            if t_end is None:
                raise ValueError("t_end (the last step with mask updates, e.g. 75% of training) is required")
            _positive_int("t_end", t_end)

        def alpha_ok() -> None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
                raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")

        def seed_ok() -> None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got {type(seed).__name__}")

        checks = [model_ok, optimizer_ok, lambda: check_sparsity("sparsity", sparsity),
                  lambda: _positive_int("delta_t", delta_t), t_end_ok, alpha_ok,
                  lambda: check_granularity(granularity, block_size), seed_ok]
        problems: list[Exception] = []
        for check in checks:
            try:
                check()
            except (TypeError, ValueError) as exc:
                problems.append(exc)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise type(problems[0])(f"{type(self).__name__}: {len(problems)} bad arguments: "
                                    + "; ".join(str(p) for p in problems))

    # ------------------------------------------------------------------ steps
    def step(self) -> bool:
        """Advance one training step (call after ``optimizer.step()``); returns True when masks changed.

        Raises RuntimeError once the manager holds no layer (e.g. every one was converted
        by :func:`~sparsevit.sparse_training.to_block_sparse`): stepping would do nothing.
        """
        if not self.manager.layers:
            raise RuntimeError(
                f"{type(self).__name__}.step(): the mask manager holds no layer any more (to_block_sparse converted "
                "them, or they were released), so there is nothing to update: stop calling step(), the "
                "converted layers keep their fixed block pattern")
        self.t += 1
        updated = False
        if self.is_update_step(self.t):
            self._check_dense_grads()
            self._update(self.drop_fraction(self.t))
            updated = True
        self.manager.dense_grads.clear()
        self.manager.collect_dense_grads = self.needs_dense_grad()
        return updated

    def _grow_scores(self, name: str) -> torch.Tensor:
        """This rank's units' growth scores: uniform random (SET) or the pooled ``|dense gradient|`` (RigL)."""
        layer = self.manager.layers[name]
        device = layer.local_mask.device
        if self.grow == "random":
            # Drawn whole on every rank (one generator state everywhere), this rank's units kept.
            scores = torch.rand(layer.num_units, generator=self.manager.generator)
            n = layer.local_mask.numel()
            return scores[layer.unit_offset: layer.unit_offset + n].to(device)
        grad = self.manager.dense_grads.get(name)
        if grad is None:  # unused in forward: a zero gradient (module docstring)
            grad = torch.zeros(layer.local_shape, dtype=torch.float32, device=device)
        pooled = layer.pool(grad)
        if layer.shard is None:  # DDP: average over ranks (FSDP2 already reduce-scattered the mean)
            pooled = self.manager.all_reduce_mean(pooled)
        return pooled.flatten()

    def _check_dense_grads(self) -> None:
        """Error when backward never ran; warn (once per layer) about layers without a gradient."""
        if self.grow != "gradient":
            return
        missing = [n for n in self.manager.layers if n not in self.manager.dense_grads]
        if len(missing) == len(self.manager.layers):
            raise RuntimeError(
                f"no dense gradient was recorded for any layer on update step {self.t}: call backward() "
                "then step() exactly once per training step"
            )
        new = [n for n in missing if n not in self._warned_no_grad]
        if new:
            self._warned_no_grad.update(new)
            warnings.warn(
                f"RigL: layer(s) {new} received no gradient on update step {self.t} (not used in forward?): "
                "they are scored with a zero gradient, so they regrow their lowest-index free units at zero; "
                "leave them out with filter if that is not wanted",
                UserWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def _update(self, fraction: float) -> None:
        comm_before = self.manager.comm.snapshot()
        n_active = self.manager.active_counts()
        new_masks, dropped = {}, {}
        for name, layer in self.manager.layers.items():
            mask = layer.local_mask.flatten()
            k = int(fraction * n_active[name])
            dropped[name] = k
            if k == 0:
                new_masks[name] = layer.local_mask
                continue
            # Drop the k active units of smallest pooled |W| (ties: highest index first), i.e.
            # keep the top n − k by (|W| descending, index ascending).
            inf = torch.tensor(float("inf"), device=mask.device)
            drop_scores = torch.where(mask, layer.pool(layer.local_weight()).flatten(), inf)
            kept = mask & ~layer.top_units(drop_scores, k, largest=False, low_index_first=False).flatten()
            grow_scores = torch.where(kept, -inf, self._grow_scores(name).to(mask.device))
            grown = layer.top_units(grow_scores, k).flatten()
            new_masks[name] = (kept | grown).reshape(layer.local_unit_shape)
        old = {name: layer.local_mask for name, layer in self.manager.layers.items()}
        for name, layer in self.manager.layers.items():
            layer.local_mask = new_masks[name]
        self.manager.sync_masks()
        regrown_local = 0
        for name, layer in self.manager.layers.items():
            regrown = layer.expand(layer.local_mask & ~old[name])
            regrown_local += int(regrown.sum())
            layer.local_weight().masked_fill_(regrown, 0)
            reset_optimizer_state(self.optimizer, layer.weight, regrown)
        self.manager.apply_masks()
        regrown_total = regrown_local
        if self.manager.sharded:
            regrown_total = all_reduce_sum([regrown_local], self.manager.shard_group, self.manager.comm)[0]
        total_sparsity, layer_sparsity = self.manager.sparsity_summary()
        record = {
            "step": self.t,
            "drop_fraction": fraction,
            "dropped_units": dropped,
            "regrown_weights": regrown_total,
            "sparsity": total_sparsity,
        }
        if self.manager.sharded:
            after = self.manager.comm.snapshot()
            record["comm"] = {"calls": after["calls"] - comm_before["calls"],
                              "bytes_sent": after["bytes_sent"] - comm_before["bytes_sent"]}
        self.history.append(record)
        logger.info("%s step %d: drop fraction %.4f, %d units dropped and regrown, %d weights regrown at 0, "
                    "total sparsity %.4f", type(self).__name__, self.t, fraction, sum(dropped.values()), regrown_total,
                    record["sparsity"])
        for name in self.manager.layers:
            logger.debug("  %s: %d units dropped/regrown, sparsity %.4f", name, dropped[name], layer_sparsity[name])
        if self.callback is not None:
            self.callback(dict(record))

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Step, schedule, history, and the manager's masks and generator state."""
        return {
            "t": self.t,
            "grow": self.grow,
            "delta_t": self.delta_t,
            "t_end": self.t_end,
            "alpha": self.alpha,
            "history": [dict(h) for h in self.history],
            "manager": self.manager.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: the next decisions are exactly those of the uninterrupted run.

        The whole state is checked first (counters, schedule, history, and the
        manager's masks via :meth:`MaskManager.check_state`); a refused state is a
        ValueError (TypeError when it is no mapping) and changes nothing.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
        for key in ("t", "grow", "delta_t", "t_end", "alpha", "history", "manager"):
            if key not in state:
                raise ValueError(f"state lacks the key {key!r} (not a {type(self).__name__}.state_dict())")
        if state["grow"] != self.grow:
            raise ValueError(f"state is for grow={state['grow']!r}, this trainer has grow={self.grow!r}")
        t = _state_int("t", state["t"], 0)
        delta_t = _state_int("delta_t", state["delta_t"], 1)
        t_end = _state_int("t_end", state["t_end"], 0 if self.grow is None else 1)
        alpha = state["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"state alpha must be a float in [0, 1], got {alpha!r}")
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
            raise ValueError(f"state history must be a list of dicts, got {type(history).__name__}")
        if not isinstance(state["manager"], Mapping):
            raise ValueError(f"state manager must be a mapping from MaskManager.state_dict(), got {type(state['manager']).__name__}")
        checked = self.manager.check_state(state["manager"])
        # Commit: nothing below can fail on a checked state.
        self.t, self.delta_t, self.t_end, self.alpha = t, delta_t, t_end, float(alpha)
        self.history = [dict(h) for h in history]
        self.manager._commit_state(checked)
        self.manager.dense_grads.clear()
        self.manager.collect_dense_grads = self.needs_dense_grad()

    def block_mask(self, name: str) -> torch.Tensor:
        """The ``(M/b, K/b)`` block mask of layer ``name`` (block granularity only)."""
        return self.manager.block_mask(name)


class RigL(DynamicSparseTraining):
    """RigL: drop by |W|, grow by |dense gradient| (Evci et al. 2020)."""

    grow = "gradient"


class SET(DynamicSparseTraining):
    """Sparse Evolutionary Training: drop by |W|, grow at random (Mocanu et al. 2018)."""

    grow = "random"


class StaticSparse(DynamicSparseTraining):
    """A fixed random sparse mask for the whole run (the baseline of RigL's Table 1)."""

    grow = None
