"""Swap the ``nn.Linear`` layers of a model for :class:`BlockSparseLinear`, with a report.

Each eligible Linear is replaced by ``BlockSparseLinear.from_dense`` at the given block
size and sparsity (largest-norm blocks kept, RigL/lottery-ticket style magnitude
pruning at block granularity).  Every Linear that is not converted is listed with the
reason: excluded by the filter, a shape that is not a multiple of the block size, or a
Linear whose owner reads its ``.weight`` directly (``nn.MultiheadAttention.out_proj``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from ..layer_filters import default_filter, resolve_filter
from .block_sparse_linear import BlockSparseLinear

__all__ = ["ConversionReport", "sparsify_linears"]


@dataclass
class ConversionReport:
    """What :func:`sparsify_linears` did: converted module names, and skipped ones with why."""

    converted: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} Linear layer(s):"]
        lines += [f"  {name}" for name in self.converted]
        lines.append(f"skipped {len(self.skipped)}:")
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _skip_reason(name: str, module: nn.Linear, parent: nn.Module, block_size: int) -> Optional[str]:
    if isinstance(parent, nn.MultiheadAttention):
        return "owned by nn.MultiheadAttention, which reads its .weight directly"
    bad = [f"{dim}={getattr(module, dim)}" for dim in ("in_features", "out_features") if getattr(module, dim) % block_size]
    if bad:
        return f"{', '.join(bad)} not a multiple of block_size={block_size}"
    return None


def sparsify_linears(
    model: nn.Module,
    *,
    block_size: int,
    sparsity: float,
    filter: Optional[Callable[[str, nn.Linear], bool]] = None,  # noqa: A002 - the public name
    norm: str = "l2",
    backend: Optional[str] = None,
    filter_fn: Optional[Callable[[nn.Linear, str], bool]] = None,
) -> ConversionReport:
    """Replace, in place, every eligible ``nn.Linear`` of ``model`` by a :class:`BlockSparseLinear`.

    Each converted layer keeps the ``n − round(sparsity · n)`` blocks of largest ``norm``
    of its weight (``n`` its block count).

    Args:
        model: the model to convert (modified in place).
        block_size: 16, 32, 64 or 128.
        sparsity: fraction of the blocks dropped in each converted layer.
        filter: ``filter(qualified_name, linear) -> bool``; False excludes that layer.
            Default: every Linear except the patch embedding / stem and the classifier head
            (:func:`sparsevit.layer_filters.default_filter`, as for the mask managers).
        norm: ``"l2"`` or ``"l1"`` block norm.
        backend: backend of the converted layers (None: automatic).
        filter_fn: torchao's order instead, ``filter_fn(linear, qualified_name) -> bool``;
            give ``filter`` or ``filter_fn``, not both.

    A filter that excludes every Linear of a model that has some warns (a filter written
    for the other argument order is the usual cause).

    Returns:
        A :class:`ConversionReport` of the converted names and the skipped ones with reasons.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    custom = filter is not None or filter_fn is not None
    keep = resolve_filter(filter, filter_fn, default_filter)
    report = ConversionReport()
    targets = []
    linears = 0
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            linears += 1
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not keep(name, child):
                report.skipped[name] = ("excluded by the filter" if custom else
                                        "patch embedding / stem or classifier head: excluded by default (pass filter= to include it)")
                continue
            reason = _skip_reason(name, child, parent, block_size)
            if reason is not None:
                report.skipped[name] = reason
                continue
            targets.append((name, parent, child_name, child))
    if custom and linears and all(why == "excluded by the filter" for why in report.skipped.values()) \
            and len(report.skipped) == linears:
        which = "filter(name, module)" if filter is not None else "filter_fn(module, name)"
        warnings.warn(f"sparsify_linears: the filter excluded all {linears} Linear layers; note the argument order: "
                      f"{which} (torchao's filter_fn order is (module, fqn): pass it as filter_fn=)",
                      UserWarning, stacklevel=2)
    for name, parent, child_name, child in targets:
        setattr(parent, child_name, BlockSparseLinear.from_dense(
            child, block_size=block_size, sparsity=sparsity, norm=norm, backend=backend))
        report.converted.append(name)
    return report
