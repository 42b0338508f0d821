"""The mask manager: one binary mask per sparsified weight, kept exact through training.

Sparse training as in RigL (Evci et al., ICML 2020) and lottery tickets (Frankle &
Carbin, ICLR 2019) keeps, for every sparsified weight ``W`` with mask ``M``,

    W = W ⊙ M            after initialisation and after every optimizer step,
    ∂L/∂W ← ∂L/∂W ⊙ M    before the gradient is accumulated into ``W.grad``.

Masks are plain bool tensors owned by :class:`MaskManager`, never forward hooks
or ``torch.nn.utils.prune`` re-parametrisations, so the model keeps its own
``state_dict`` keys, deep-copies and pickles as before, and the weights really
are zero (the invariant a block-sparse kernel needs).

Granularity ``element`` masks single weights.  Granularity ``block`` masks
``b × b`` tiles of the weight viewed as a matrix ``(M, K) = (n_out, n_in·k_h·k_w)``
(b ∈ {16, 32, 64, 128}, dividing both): the mask is a ``(M/b, K/b)`` bool tensor,
scores are pooled per block (mean of ``|·|`` over the tile) and the mask is
expanded to elements when applied.  :meth:`MaskedWeight.block_mask` returns the
``(M/b, K/b)`` mask from which a block-sparse layout can be built.

Distributed data parallel: masks are made from a seeded CPU generator that is
the same on every rank and broadcast from rank 0 after every change, and scores
that depend on data (gradients) are all-reduced first, so every rank holds the
same masks.

Fully sharded data parallel (FSDP2 ``fully_shard``, dim-0 ``Shard`` on a 1-D mesh):
a weight that is a sharded DTensor gets a mask sharded like it; each rank holds
the mask rows of its own rows (:mod:`.sharding`) and applies them to its local
shard with no all-gather.  Gradients are masked in a post-accumulate-grad hook on
the sharded parameter (FSDP2 runs it after the reduce-scatter, before any
gradient clipping or optimizer step).  Selections over a whole weight (magnitude
init, RigL's drop and grow, IMP) are exact top-k across the shards
(:func:`~.sharding.sharded_topk_mask`), so they equal the single-process ones;
counts are all-reduced.  ``MaskedWeight.mask`` and :meth:`MaskManager.masks` return
DTensors sharded like the weights, and :meth:`MaskManager.state_dict` holds them,
ready for ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..layer_filters import SKIP_NAMES, LayerFilter, default_filter, resolve_filter  # noqa: F401 (re-exported)
from .density import Distribution, check_sparsity, layer_densities
from .sharding import (
    CommStats,
    RowShard,
    all_gather_rows,
    all_reduce_sum,
    check_block_aligned,
    is_dtensor,
    lexicographic_order,
    shard_of,
    sharded_topk_mask,
)

__all__ = [
    "BLOCK_SIZES",
    "GRANULARITIES",
    "LayerFilter",
    "MaskManager",
    "MaskedWeight",
    "default_filter",
    "allocate_units",
    "reset_optimizer_state",
    "topk_mask",
]

GRANULARITIES = ("element", "block")
BLOCK_SIZES = (16, 32, 64, 128)
def check_granularity(granularity: object, block_size: object) -> Optional[int]:
    """``granularity`` must be ``"element"`` (``block_size`` None) or ``"block"`` with ``block_size`` in BLOCK_SIZES."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "element":
        if block_size is not None:
            raise ValueError(f"block_size must be None for granularity='element', got {block_size!r}")
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int in {BLOCK_SIZES} for granularity='block', got {block_size!r}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    return block_size


class MaskedWeight:
    """One sparsified weight ``module.weight`` and its mask of units (elements or ``b × b`` blocks).

    ``mask`` has the weight's shape (``element``) or ``(M/b, K/b)`` (``block``),
    with ``(M, K) = (n_out, numel / n_out)``.  For an FSDP2-sharded weight ``shape``,
    ``unit_shape`` and ``num_units`` describe the whole weight, while this rank holds
    only ``local_mask`` (``local_unit_shape``: the units of its rows, ``unit_offset`` the
    flat index of the first one) and ``element_mask`` (its rows of the element mask).
    """

    def __init__(self, name: str, module: nn.Module, block_size: Optional[int]):
        self.name = name
        self.module = module
        self.block_size = block_size
        w = module.weight
        self.shard: Optional[RowShard] = shard_of(name, w)
        # FSDP2 swaps ``module.weight`` for the unsharded tensor during forward/backward;
        # the sharded parameter (what the optimizer holds) is kept here.
        self._sharded_param = w if self.shard is not None else None
        self.stats: Optional[CommStats] = None
        self.shape = tuple(w.shape)
        self.matrix_shape = (self.shape[0], w.numel() // self.shape[0])
        m, k = self.matrix_shape
        rows = self.shard.rows if self.shard is not None else m
        start = self.shard.row_start if self.shard is not None else 0
        self.local_shape = (rows, *self.shape[1:])
        if block_size is not None:
            if m % block_size or k % block_size:
                raise ValueError(
                    f"block_size={block_size} must divide both dims of layer {name!r} "
                    f"(weight {self.shape} viewed as the matrix {self.matrix_shape})"
                )
            if self.shard is not None:
                check_block_aligned(name, self.shard, block_size)
            self.unit_shape = (m // block_size, k // block_size)
            self.local_unit_shape = (rows // block_size, k // block_size)
            self.unit_row_start = start // block_size
        else:
            self.unit_shape = self.shape
            self.local_unit_shape = self.local_shape
            self.unit_row_start = start
        self.unit_offset = self.unit_row_start * (math.prod(self.unit_shape[1:]))
        device = self.local_weight().device
        self._mask = torch.ones(self.local_unit_shape, dtype=torch.bool, device=device)
        self._element = torch.ones(self.local_shape, dtype=torch.bool, device=device)

    @property
    def weight(self) -> nn.Parameter:
        """The parameter (for an FSDP2 layer: the sharded DTensor parameter the optimizer holds)."""
        if self._sharded_param is not None:
            return self._sharded_param
        w = self.module.weight
        if is_dtensor(w):
            raise RuntimeError(
                f"layer {self.name!r} was sharded (fully_shard) after its mask manager was built: build RigL / "
                "LotteryTicket / MaskManager after fully_shard(model), and the optimizer from the sharded parameters")
        return w

    def local_weight(self) -> torch.Tensor:
        """This rank's rows of the weight (the weight itself when it is not sharded)."""
        w = self.weight
        return w.to_local() if self.shard is not None else w

    def top_units(self, scores: torch.Tensor, k: int, *, largest: bool = True,
                  low_index_first: bool = True) -> torch.Tensor:
        """Bool mask of :attr:`local_unit_shape`: this rank's share of the ``k`` best units of the whole weight.

        ``scores`` are this rank's units (all of them when unsharded).  Order: by score
        (descending if ``largest``), ties by global unit index (lowest first if
        ``low_index_first``); across FSDP2 shards by :func:`~.sharding.sharded_topk_mask`,
        so the result is the one the gathered scores would give.
        """
        if self.shard is not None:
            return sharded_topk_mask(scores.reshape(self.local_unit_shape), k, self.unit_offset, self.num_units,
                                     self.shard.group, largest=largest, low_index_first=low_index_first,
                                     stats=self.stats)
        if largest and low_index_first:
            return topk_mask(scores, k).reshape(self.local_unit_shape)
        flat = scores.reshape(-1)
        k = max(0, min(int(k), flat.numel()))
        order = lexicographic_order(flat.detach().float().cpu(), torch.arange(flat.numel()), largest, low_index_first)
        out = torch.zeros(flat.numel(), dtype=torch.bool)
        out[order[:k]] = True
        return out.reshape(self.local_unit_shape).to(flat.device)

    @property
    def granularity(self) -> str:
        return "element" if self.block_size is None else "block"

    @property
    def num_units(self) -> int:
        return math.prod(self.unit_shape)

    @property
    def local_mask(self) -> torch.Tensor:
        """This rank's unit mask (the whole unit mask when the weight is not sharded)."""
        return self._mask

    @property
    def mask(self) -> torch.Tensor:
        """The unit mask (bool): weight-shaped, or ``(M/b, K/b)`` for blocks.

        For a sharded weight, a DTensor sharded like it (``Shard(0)``) over :attr:`local_mask`.
        """
        if self.shard is None:
            return self._mask
        return self._as_dtensor(self._mask)

    def _as_dtensor(self, local: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Shard

        shape = torch.Size(self.unit_shape)
        stride = tuple(math.prod(self.unit_shape[i + 1:]) for i in range(len(self.unit_shape)))
        return DTensor.from_local(local, self.shard.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)

    def _localize(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` (a whole unit mask, or a DTensor of one) as this rank's rows; ValueError on a wrong shape."""
        if is_dtensor(value):
            if tuple(value.shape) != self.unit_shape:
                raise ValueError(f"mask of layer {self.name!r} must have shape {self.unit_shape}, got {tuple(value.shape)}")
            from torch.distributed.tensor import Shard

            same = (self.shard is not None and value.device_mesh == self.shard.mesh
                    and tuple(value.placements) == (Shard(0),))
            if same:
                return value.to_local()
            return value.to(torch.uint8).full_tensor().to(torch.bool) if value.dtype == torch.bool else value.full_tensor()
        if tuple(value.shape) != self.unit_shape:
            raise ValueError(f"mask of layer {self.name!r} must have shape {self.unit_shape}, got {tuple(value.shape)}")
        if self.shard is None:
            return value
        return value[self.unit_row_start: self.unit_row_start + self.local_unit_shape[0]]

    @mask.setter
    def mask(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"mask of {self.name!r} must be a torch.Tensor, got {type(value).__name__}")
        local = self._localize(value)
        self.local_mask = local

    @local_mask.setter
    def local_mask(self, value: torch.Tensor) -> None:
        if tuple(value.shape) != self.local_unit_shape:
            raise ValueError(f"local mask of {self.name!r} must have shape {self.local_unit_shape}, "
                             f"got {tuple(value.shape)}")
        self._mask = value.to(device=self._element.device, dtype=torch.bool).clone()
        self._element = self.expand(self._mask)

    @property
    def element_mask(self) -> torch.Tensor:
        """The mask expanded to the weight's shape (bool); this rank's rows for a sharded weight."""
        return self._element

    def full_mask(self, stats: Optional[CommStats] = None) -> torch.Tensor:
        """The whole unit mask as a plain bool tensor (an all-gather over the shards when sharded)."""
        if self.shard is None:
            return self._mask
        return all_gather_rows(self._mask, self.shard, self.unit_shape, stats if stats is not None else self.stats)

    def check_mask(self, value: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a unit mask given from outside (a checkpoint, a ticket file) without installing it.

        It must be a bool tensor of :attr:`unit_shape` (a DTensor for a sharded layer, or
        the whole mask, of which this rank keeps its rows) whose bytes are all 0 or 1 (a
        corrupted bool byte such as 0x7F reads as True but is not a valid mask).
        Returns ``(unit mask, element mask)`` on the weight's device, ready for
        :meth:`_install`; raises ValueError naming the layer.
        """
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"mask of layer {self.name!r} must be a bool tensor, got {got}")
        local = self._localize(value)
        if local.numel() and bool((local.view(torch.uint8) > 1).any()):
            raise ValueError(f"mask of layer {self.name!r} holds bytes other than 0/1 (a corrupted bool tensor)")
        unit = local.to(device=self._element.device).clone()
        return unit, self.expand(unit)

    def _install(self, checked: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._mask, self._element = checked

    def block_mask(self) -> torch.Tensor:
        """The ``(M/b, K/b)`` bool block mask (``True`` = block kept), for a block-sparse layout.

        Raises ValueError for element granularity: such a mask is not convertible.
        """
        if self.block_size is None:
            raise ValueError(f"layer {self.name!r} has element granularity: its mask has no block structure")
        return self.mask

    def active(self) -> int:
        """Number of kept units (over all shards: a collective for a sharded weight)."""
        local = int(self._mask.sum())
        return local if self.shard is None else all_reduce_sum([local], self.shard.group, self.stats)[0]

    def density(self) -> float:
        """Fraction of kept weights, ``Σ M / numel`` (over all shards: a collective for a sharded weight)."""
        local = int(self._element.sum())
        kept = local if self.shard is None else all_reduce_sum([local], self.shard.group, self.stats)[0]
        return kept / math.prod(self.shape)

    def pool(self, t: torch.Tensor) -> torch.Tensor:
        """Per-unit score of a weight-shaped tensor (or this rank's rows of one): ``|t|``, or the mean of ``|t|`` per block."""
        a = t.detach().abs().float()
        if self.block_size is None:
            return a
        b = self.block_size
        rows, k = a.shape[0], self.matrix_shape[1]
        return a.reshape(rows // b, b, k // b, b).mean(dim=(1, 3))

    def expand(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """Element mask from a unit mask (block ``(i, j)`` → rows ``ib..ib+b``, cols ``jb..jb+b``), whole or this rank's rows."""
        if self.block_size is None:
            return unit_mask.to(torch.bool)
        b = self.block_size
        full = unit_mask.to(torch.bool).repeat_interleave(b, 0).repeat_interleave(b, 1)
        return full.reshape(full.shape[0], *self.shape[1:])

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the masked weights in place: ``W ← W ⊙ M`` (exact zeros, also where W is inf/nan); local shard only."""
        self.local_weight().masked_fill_(~self._element, 0)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> int:
    """Zero every per-parameter optimizer state tensor of ``param``'s shape where ``where`` is True.

    Covers SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``, ``exp_avg_sq`` (and
    ``max_exp_avg_sq``) and any other state of the same shape; scalar state such as
    ``step`` is left alone.  For an FSDP2 (DTensor) parameter, ``where`` holds this rank's rows
    and the local shards of the state are zeroed.  Returns how many state tensors were touched.
    """
    state = optimizer.state.get(param, {})
    touched = 0
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            target = value.to_local() if is_dtensor(value) else value  # FSDP2: ``where`` holds this rank's rows
            with torch.no_grad():
                target.masked_fill_(where.to(target.device), 0)
            touched += 1
    return touched


def _world() -> tuple[bool, int, int]:
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


class MaskManager:
    """Owns one :class:`MaskedWeight` per selected layer of ``model`` and keeps ``W = W ⊙ M``.

    ``sparsity`` in [0, 1) is split over layers by ``distribution`` (see
    :func:`~sparsevit.sparse_training.density.layer_densities`); layer ``l`` keeps
    ``round(d_l · units_l)`` units.  ``init`` picks the initial kept units:
    ``"random"`` (uniform, from a CPU generator seeded with ``seed``, the same on
    every rank), ``"magnitude"`` (largest pooled ``|W|``), or ``"dense"`` (all).
    ``filter(name, module)`` selects the layers (default :func:`default_filter`), or
    torchao-style ``filter_fn(module, fqn)`` (see :mod:`sparsevit.layer_filters`).

    Gradients of masked weights are zeroed by a tensor hook (before accumulation);
    :meth:`attach` adds an optimizer post-step hook that re-applies the masks.

    Frozen weights (``requires_grad=False``) have no gradient to mask: with the
    default filter they are left out (their names are in :attr:`skipped_frozen`, and
    ``sparsity`` is spread over the trainable layers); a custom ``filter`` that picks
    one is a ValueError naming the layer.

    :meth:`load_state_dict` checks the whole state (layer names, shapes, bool masks
    with bytes in {0, 1}, densities, generator) before it changes anything.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float = 0.0,
        *,
        distribution: Distribution = "erk",
        granularity: str = "element",
        block_size: Optional[int] = None,
        filter: Optional[LayerFilter] = None,
        init: str = "random",
        seed: int = 0,
        optimizer: Optional[torch.optim.Optimizer] = None,
        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.sparsity = check_sparsity("sparsity", sparsity)
        self.block_size = check_granularity(granularity, block_size)
        self.granularity = granularity
        if init not in ("random", "magnitude", "dense"):
            raise ValueError(f"init must be 'random', 'magnitude' or 'dense', got {init!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        filt = resolve_filter(filter, filter_fn, default_filter)
        self.model = model
        self.layers: dict[str, MaskedWeight] = {}
        self.skipped_frozen: list[str] = []
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2 and filt(name, module):
                if not w.requires_grad:
                    if filter is None and filter_fn is None:
                        self.skipped_frozen.append(name)
                        continue
                    raise ValueError(
                        f"filter selected layer {name!r}, whose weight is frozen (requires_grad=False): its "
                        "gradient cannot be masked; unfreeze it or leave it out of filter"
                    )
                self.layers[name] = MaskedWeight(name, module, self.block_size)
        if not self.layers:
            frozen = f" (frozen, left out: {self.skipped_frozen})" if self.skipped_frozen else ""
            raise ValueError(f"filter selected no layer with a trainable weight of 2 or more dims to sparsify in model{frozen}")
        self.densities = layer_densities({n: l.shape for n, l in self.layers.items()}, self.sparsity, distribution)
        self.targets = allocate_units({n: l.num_units for n, l in self.layers.items()}, self.densities)
        self.generator = torch.Generator().manual_seed(seed)
        self.comm = CommStats()
        groups = {id(l.shard.group): l.shard.group for l in self.layers.values() if l.shard is not None}
        if len(groups) > 1:
            raise ValueError("the sharded layers of model lie on different device meshes: sparsevit supports one "
                             "FSDP2 mesh per model (fully_shard every module with the same mesh)")
        self.shard_group = next(iter(groups.values()), None)
        for layer in self.layers.values():
            layer.stats = self.comm
        self.collect_dense_grads = False
        self.dense_grads: dict[str, torch.Tensor] = {}
        self._hooks = [self._register_grad_hook(layer) for layer in self.layers.values()]
        self._optimizer_hook = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._init_masks(init)
        if optimizer is not None:
            self.attach(optimizer)

    # ------------------------------------------------------------------ masks
    def target_active(self, name: str) -> int:
        """Kept units of layer ``name``: ``⌊d_l · units_l⌋`` or one more (see :func:`allocate_units`)."""
        return self.targets[name]

    def refuse_sharded(self, what: str) -> None:
        """ValueError when the managed weights are FSDP2-sharded: ``what`` needs whole weights on every rank."""
        if self.sharded:
            names = [n for n, l in self.layers.items() if l.shard is not None]
            raise ValueError(
                f"{what} does not support FSDP2-sharded weights ({names[:3]}{' ...' if len(names) > 3 else ''} are "
                "DTensors): FSDP2 gathers each weight for compute and would not run the block-sparse kernels. Train "
                "sharded with the masks, save the ticket (save_ticket(path, trainer), one file from all ranks), then "
                "load_ticket(model, path) on an unsharded model (or a full state dict) and call "
                f"{what} there, e.g. for inference or DDP fine-tuning")

    @property
    def sharded(self) -> bool:
        """True when some managed weight is an FSDP2-sharded DTensor."""
        return self.shard_group is not None

    def _init_masks(self, init: str) -> None:
        for name, layer in self.layers.items():
            k = self.target_active(name)
            if init == "dense" or k == layer.num_units:
                layer.local_mask = torch.ones(layer.local_unit_shape, dtype=torch.bool)
                continue
            if init == "random":
                # Drawn whole on every rank (the same generator), then this rank's units kept:
                # the same mask as one process, and the same generator state on every rank.
                scores = torch.rand(layer.num_units, generator=self.generator)
                layer.local_mask = topk_mask(scores, k)[layer.unit_offset: layer.unit_offset + math.prod(
                    layer.local_unit_shape)].reshape(layer.local_unit_shape)
            else:
                layer.local_mask = layer.top_units(layer.pool(layer.local_weight()).cpu(), k)
        self.sync_masks()
        self.apply_masks()

    def active_counts(self) -> dict[str, int]:
        """``name -> kept units`` over the whole weight (one all-reduce for all sharded layers)."""
        local = {n: int(l.local_mask.sum()) for n, l in self.layers.items()}
        return self._global_sums(local)

    def _global_sums(self, local: Mapping[str, int]) -> dict[str, int]:
        """Per-layer integer counts summed over the shards of the sharded layers (plain layers as they are)."""
        out = dict(local)
        names = [n for n, l in self.layers.items() if l.shard is not None]
        if names:
            sums = all_reduce_sum([local[n] for n in names], self.shard_group, self.comm)
            out.update(zip(names, sums))
        return out

    def __iter__(self) -> Iterator[MaskedWeight]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def masks(self) -> dict[str, torch.Tensor]:
        """``name -> unit mask`` of every layer."""
        return {n: l.mask for n, l in self.layers.items()}

    def layer(self, name: str) -> "MaskedWeight":
        """The managed layer ``name``: a module name (``blocks.0.mlp.fc1``) or its weight's
        parameter name (``blocks.0.mlp.fc1.weight``).

        Raises KeyError (a ``LookupError``) listing the managed names on a miss.
        """
        if not isinstance(name, str):
            raise TypeError(f"name must be a str (a module or parameter name), got {type(name).__name__}")
        found = self.layers.get(name)
        if found is None and name.endswith(".weight"):
            found = self.layers.get(name[: -len(".weight")])
        if found is None:
            names = list(self.layers)
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise KeyError(f"{name!r} is not a managed layer; the managed layers are: {shown or 'none'}")
        return found

    def block_mask(self, name: str) -> torch.Tensor:
        """The ``(M/b, K/b)`` bool block mask of layer ``name`` (a module or parameter name, as in :meth:`layer`).

        ValueError for element granularity; KeyError listing the managed layers for an unknown name.
        """
        return self.layer(name).block_mask()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """``W ← W ⊙ M`` for every layer."""
        for layer in self.layers.values():
            layer.apply_()

    def _kept_weights(self) -> dict[str, int]:
        return self._global_sums({n: int(l.element_mask.sum()) for n, l in self.layers.items()})

    def sparsity_summary(self) -> tuple[float, dict[str, float]]:
        """``(total, per layer)`` sparsity from one count of the kept weights (one collective when sharded)."""
        kept = self._kept_weights()
        per_layer = {n: 1.0 - kept[n] / math.prod(l.shape) for n, l in self.layers.items()}
        total = 1.0 - sum(kept.values()) / sum(math.prod(l.shape) for l in self.layers.values())
        return total, per_layer

    def layer_sparsity(self) -> dict[str, float]:
        """``name -> 1 − Σ M / numel`` per layer (over all shards)."""
        return self.sparsity_summary()[1]

    def total_sparsity(self) -> float:
        """``1 − Σ_l Σ M_l / Σ_l numel_l`` over the sparsified layers (over all shards)."""
        return self.sparsity_summary()[0]

    # -------------------------------------------------------------- gradients
    def _register_grad_hook(self, layer: MaskedWeight):
        if layer.shard is not None:
            return self._register_sharded_grad_hook(layer)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.collect_dense_grads:
                prev = self.dense_grads.get(layer.name)
                g = grad.detach().clone()
                self.dense_grads[layer.name] = g if prev is None else prev + g
            return grad.masked_fill(~layer.element_mask, 0)

        return layer.weight.register_hook(hook)

    def _register_sharded_grad_hook(self, layer: MaskedWeight):
        """Mask this rank's gradient shard after FSDP2's reduce-scatter has accumulated it into ``.grad``.

        The hook sees the accumulated gradient ``G = G_prev ⊙ M + g``; with ``D_prev`` the
        dense gradient kept so far, the dense total is ``where(M, G, D_prev + G)``.
        """
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            local = grad.to_local() if is_dtensor(grad) else grad
            with torch.no_grad():
                if self.collect_dense_grads:
                    prev = self.dense_grads.get(layer.name)
                    dense = local.detach().clone() if prev is None else torch.where(layer.element_mask, local, prev + local)
                    self.dense_grads[layer.name] = dense
                local.masked_fill_(~layer.element_mask, 0)

        return layer.weight.register_post_accumulate_grad_hook(hook)

    # -------------------------------------------------------------- optimizer
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every ``optimizer.step()``; the optimizer must hold every masked weight."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, l in self.layers.items() if id(l.weight) not in held]
        if missing:
            raise ValueError(
                f"optimizer does not hold the weights of the sparsified layers {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}: build it from this model's parameters"
            )
        self.detach_optimizer()
        self.optimizer = optimizer
        self._optimizer_hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply_masks())

    def detach_optimizer(self) -> None:
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None
        self.optimizer = None

    def release(self, name: str) -> None:
        """Stop managing layer ``name`` (its gradient hook removed), e.g. once it is block-sparse."""
        if name not in self.layers:
            raise ValueError(f"name must be a managed layer, got {name!r}")
        position = list(self.layers).index(name)
        if self._hooks:
            self._hooks.pop(position).remove()
        del self.layers[name]
        self.dense_grads.pop(name, None)

    def remove(self) -> None:
        """Remove every hook this manager installed (the weights stay as they are)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.detach_optimizer()

    # ------------------------------------------------------------ distributed
    def sync_masks(self) -> None:
        """Broadcast every mask from rank 0 (no-op outside torch.distributed)."""
        on, _, world = _world()
        if not on or world == 1:
            return
        for layer in self.layers.values():
            if layer.shard is not None:  # sharded masks come from exact cross-shard selections
                continue
            buf = layer.mask.to(torch.uint8)
            buf = buf.to(_comm_device(buf))
            dist.broadcast(buf, src=0)
            layer.mask = buf.to(torch.bool)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over ranks (``t`` itself outside torch.distributed)."""
        on, _, world = _world()
        if not on or world == 1:
            return t
        buf = t.detach().float().to(_comm_device(t)).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return (buf / world).to(t.device)

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Masks (CPU bool), densities and the generator state."""
        return {
            "granularity": self.granularity,
            "block_size": self.block_size,
            "densities": dict(self.densities),
            "masks": {n: self._mask_state(l) for n, l in self.layers.items()},
            "generator": self.generator.get_state(),
        }

    @staticmethod
    def _mask_state(layer: MaskedWeight) -> torch.Tensor:
        """A copy of the unit mask: CPU bool, a DTensor sharded like the weight for an FSDP2 layer (DCP-ready)."""
        if layer.shard is None:
            return layer.mask.cpu().clone()
        return layer._as_dtensor(layer.local_mask.clone())

    def check_masks(self, masks: object, what: str = "masks") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Check ``masks`` (``name -> unit mask``, one per managed layer) without installing them.

        Raises ValueError naming unknown and missing layers (with the valid names) or
        the first bad mask (see :meth:`MaskedWeight.check_mask`).  The result goes to
        :meth:`_install_masks`.
        """
        if not isinstance(masks, Mapping):
            raise ValueError(f"{what} must be a mapping name -> bool mask, got {type(masks).__name__}")
        if set(masks) != set(self.layers):
            raise ValueError(
                f"{what} does not match this manager's layers: {self._name_mismatch(masks)}; "
                f"valid names: {list(self.layers)}"
            )
        return {name: layer.check_mask(masks[name]) for name, layer in self.layers.items()}

    def _install_masks(self, checked: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, layer in self.layers.items():
            layer._install(checked[name])

    def check_state(self, state: object) -> dict:
        """Check a :meth:`state_dict` for this manager completely, changing nothing; ValueError on any problem."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
        for key in ("granularity", "block_size", "densities", "masks", "generator"):
            if key not in state:
                raise ValueError(f"state lacks the key {key!r} (not a MaskManager.state_dict())")
        if state["granularity"] != self.granularity or state["block_size"] != self.block_size:
            raise ValueError(
                f"state has granularity {state['granularity']!r} / block_size {state['block_size']!r}, "
                f"this manager {self.granularity!r} / {self.block_size!r}"
            )
        checked = self.check_masks(state["masks"], "state masks")
        densities = state["densities"]
        if not isinstance(densities, Mapping) or set(densities) != set(self.layers):
            got = sorted(map(str, densities)) if isinstance(densities, Mapping) else type(densities).__name__
            raise ValueError(f"state densities are for layers {got}, this manager has {sorted(self.layers)}")
        for name, d in densities.items():
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= float(d) <= 1.0:
                raise ValueError(f"state densities[{name!r}] must be a float in [0, 1], got {d!r}")
        gen = state["generator"]
        try:
            if not isinstance(gen, torch.Tensor) or gen.dtype != torch.uint8:
                raise TypeError(f"expected a uint8 tensor, got {getattr(gen, 'dtype', type(gen).__name__)}")
            torch.Generator().set_state(gen)  # a scratch generator: ours changes only on commit
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"state generator state is invalid: {err}") from None
        return {"masks": checked, "densities": {n: float(d) for n, d in densities.items()}, "generator": gen.clone()}

    def _name_mismatch(self, masks: Mapping) -> str:
        """``unknown layer(s) [...], no entry for layer(s) [...]`` for the names that differ."""
        unknown = sorted(str(n) for n in masks if n not in self.layers)
        missing = [n for n in self.layers if n not in masks]
        return ", ".join(([f"unknown layer(s) {unknown}"] if unknown else []) + ([f"no entry for layer(s) {missing}"] if missing else []))

    def _commit_state(self, checked: Mapping) -> None:
        self._install_masks(checked["masks"])
        self.densities = dict(checked["densities"])
        self.targets = self.active_counts()
        self.generator.set_state(checked["generator"])
        self.apply_masks()

    def load_state_dict(self, state: Mapping) -> None:
        """Restore masks, densities and the generator; the layers and granularity must match.

        Everything is checked first (:meth:`check_state`), so a refused state leaves
        the manager and the weights as they were.
        """
        self._commit_state(self.check_state(state))


def allocate_units(units: Mapping[str, int], densities: Mapping[str, float]) -> dict[str, int]:
    """Kept units per layer with an exact total: ``c_l ∈ {⌊d_l u_l⌋, ⌈d_l u_l⌉}`` and ``Σ c_l = round(Σ d_l u_l)``.

    Largest remainders first (ties: layer order), so the total is exact even
    when layers have few units (large blocks).
    """
    exact = {n: densities[n] * units[n] for n in units}
    counts = {n: min(units[n], int(math.floor(exact[n] + 1e-9))) for n in units}
    left = int(round(sum(exact.values()))) - sum(counts.values())
    order = sorted(units, key=lambda n: -(exact[n] - counts[n]))
    for n in order:
        if left <= 0:
            break
        if counts[n] < units[n]:
            counts[n] += 1
            left -= 1
    return counts


def _comm_device(t: torch.Tensor) -> torch.device:
    """The device collectives run on: CUDA for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of ``scores``' shape with ``True`` at the ``k`` largest entries (ties: lowest index first)."""
    flat = scores.reshape(-1)
    k = max(0, min(int(k), flat.numel()))
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        # A stable descending sort makes the choice among ties deterministic on every device.
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        out[order] = True
    return out.reshape(scores.shape)
