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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..layout import BlockSparseLayout
from ..nn.block_sparse_linear import BlockSparseLinear
from .masks import MaskManager

__all__ = ["BlockSparseReport", "to_block_sparse"]


@dataclass
class BlockSparseReport:
    """What :func:`to_block_sparse` did: converted layers (with density) and skipped ones (with why)."""

    converted: list = field(default_factory=list)  # (name, density)
    skipped: list = field(default_factory=list)  # (name, reason)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s) to BlockSparseLinear"]
        lines += [f"  {name}: density {density:.3f}" for name, density in self.converted]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} layer(s) dense:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def to_block_sparse(model: nn.Module, masks: MaskManager) -> BlockSparseReport:
    """Swap the block-masked ``nn.Linear`` layers of ``model`` (in place) for ``BlockSparseLinear``.

    Args:
        model: the model ``masks`` manages.
        masks: its :class:`MaskManager` (``rigl.manager`` or ``ticket.manager`` for the trainers).

    Returns:
        a :class:`BlockSparseReport`; converted layers are removed from ``masks``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(masks, MaskManager):
        raise TypeError(f"masks must be a MaskManager, got {type(masks).__name__}")
    if masks.model is not model:
        raise ValueError("masks must manage this model (MaskManager(model, ...))")
    report = BlockSparseReport()
    masks.apply_masks()
    for name, layer in list(masks.layers.items()):
        module = layer.module
        if layer.block_size is None:
            report.skipped.append((name, "element granularity: no block structure to run block-sparse"))
            continue
        if type(module) is not nn.Linear:
            report.skipped.append((name, f"{type(module).__name__} is not an nn.Linear"))
            continue
        layout = BlockSparseLayout.from_mask(layer.block_mask().to(module.weight.device), layer.block_size)
        _set_child(model, name, BlockSparseLinear.from_dense(module, layout=layout))
        masks.release(name)
        report.converted.append((name, layout.density))
    return report
