"""Conversion of block-masked layers to block-sparse kernels, so sparsity becomes speed.

``to_block_sparse(model, masks)`` replaces every ``nn.Linear`` whose mask (from a
:class:`~sparsevit.sparse_training.masks.MaskManager`, or RigL / lottery tickets built
on one) has block granularity by a :class:`sparsevit.nn.BlockSparseLinear` holding only
the kept ``b × b`` blocks (``BlockSparseLayout.from_mask``): forward ``y = x Wᵀ + b``
and backward (``dW`` by ``sdd``) then run on the block-sparse kernels.  The output is
that of the masked dense model.  Layers with element granularity, and Conv2d layers,
are reported as not convertible and left as they are.

The conversion fixes the sparsity pattern: do it for inference, or for training once
masks stop changing (after RigL's T_end, for a lottery ticket, or for static sparsity).
The mask manager's hooks on the replaced layers are removed.

Training on after the conversion: the new layers have new parameters (the packed
``(nnz, b, b)`` blocks and the bias).  The optimizer given (else the one attached to the
manager, as RigL and lottery tickets attach theirs) is updated in place: each old
weight and bias is replaced by its successor in the same parameter group, and every
per-parameter state tensor of the weight's shape (momentum, ``exp_avg``,
``exp_avg_sq``, ...) is packed to the kept blocks the same way, so training continues
exactly where it was.  Without an optimizer, converting a model in training mode warns
that no optimizer holds the new parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..block_sparse import BlockSparseMatrix
from ..layout import BlockSparseLayout
from ..nn.block_sparse_linear import BlockSparseLinear
from .masks import MaskManager

__all__ = ["BlockSparseReport", "to_block_sparse"]


@dataclass
class BlockSparseReport:
    """What :func:`to_block_sparse` did: converted layers (with density) and skipped ones (with why)."""

    converted: list = field(default_factory=list)  # (name, density)
    skipped: list = field(default_factory=list)  # (name, reason)
    optimizer_updated: bool = False  # the new parameters replaced the old ones in an optimizer
    target: str = "BlockSparseLinear"  # what the converted layers became
    new_parameters: bool = True  # False: the layers keep their parameters (train_block_sparse)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s) to {self.target}"]
        lines += [f"  {name}: density {density:.3f}" for name, density in self.converted]
        if self.converted and self.new_parameters:
            lines.append("optimizer: holds the new parameters (state packed to the kept blocks)" if self.optimizer_updated
                         else "optimizer: none updated; build one over model.parameters() before training on")
        if self.skipped:
            lines.append(f"left {len(self.skipped)} layer(s) dense:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _optimizer_slots(optimizer: torch.optim.Optimizer) -> dict[int, tuple[dict, int]]:
    """``id(param) -> (param group, index in its params)``."""
    return {id(p): (group, i) for group in optimizer.param_groups for i, p in enumerate(group["params"])}


def _swap_parameter(optimizer: torch.optim.Optimizer, slots: dict, old: torch.Tensor, new: torch.Tensor,
                    convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Put ``new`` where ``old`` was in ``optimizer``; its state tensors of ``old``'s shape through ``convert``."""
    group, i = slots[id(old)]
    group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {k: convert(v) if torch.is_tensor(v) and v.shape == old.shape else v
                                for k, v in state.items()}


def to_block_sparse(model: nn.Module, masks: MaskManager,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> BlockSparseReport:
    """Swap the block-masked ``nn.Linear`` layers of ``model`` (in place) for ``BlockSparseLinear``.

    Each converted layer computes ``y = x (W ⊙ M)ᵀ + b`` from its kept blocks only.

    Args:
        model: the model ``masks`` manages.
        masks: its :class:`MaskManager` (``rigl.manager`` or ``ticket.manager`` for the trainers).
        optimizer: the optimizer to move to the new parameters (default: the one attached to
            ``masks``, if any); it must hold the weight (and bias) of every converted layer.

    Returns:
        a :class:`BlockSparseReport`; converted layers are removed from ``masks``.

    Raises:
        TypeError / ValueError for a bad argument, or an optimizer missing a converted
        layer's parameters (checked before anything changes); ValueError for FSDP2-sharded
        weights, with the route that works (see :meth:`MaskManager.refuse_sharded`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, MaskManager):
        raise TypeError(f"masks must be a MaskManager, got {type(masks).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if masks.model is not model:
        raise ValueError("masks must manage this model (MaskManager(model, ...))")
    masks.refuse_sharded("to_block_sparse")
    optimizer = optimizer if optimizer is not None else masks.optimizer
    report = BlockSparseReport()
    plan = []
    for name, layer in list(masks.layers.items()):
        module = layer.module
        if layer.block_size is None:
            report.skipped.append((name, "element granularity: no block structure to run block-sparse"))
        elif type(module) is not nn.Linear:
            report.skipped.append((name, f"{type(module).__name__} is not an nn.Linear"))
        else:
            plan.append((name, layer))
    slots = _optimizer_slots(optimizer) if optimizer is not None else {}
    if optimizer is not None:
        missing = [name for name, layer in plan
                   if any(id(p) not in slots for p in (layer.module.weight, layer.module.bias) if p is not None)]
        if missing:
            raise ValueError(f"optimizer does not hold the weight or bias of {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}: pass the optimizer that trains this model")
    masks.apply_masks()
    for name, layer in plan:
        module = layer.module
        layout = BlockSparseLayout.from_mask(layer.block_mask().to(module.weight.device), layer.block_size)
        new = BlockSparseLinear.from_dense(module, layout=layout)
        if optimizer is not None:
            def pack(t: torch.Tensor, layout: BlockSparseLayout = layout) -> torch.Tensor:
                return BlockSparseMatrix.from_dense(t.detach(), layout).values.clone()

            _swap_parameter(optimizer, slots, module.weight, new.weight, pack)
            if module.bias is not None:
                _swap_parameter(optimizer, slots, module.bias, new.bias, lambda t: t)
        _set_child(model, name, new)
        masks.release(name)
        report.converted.append((name, layout.density))
    report.optimizer_updated = optimizer is not None and bool(plan)
    if plan and optimizer is None and model.training:
        warnings.warn(
            f"to_block_sparse: {len(plan)} layer(s) now have new parameters that no optimizer holds; an optimizer "
            "built before the conversion will not train them. Pass optimizer= (or attach one to the MaskManager), "
            "or build the optimizer over model.parameters() after converting.", UserWarning, stacklevel=2)
    return report
