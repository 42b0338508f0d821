"""Swap timm attention modules for :class:`sparsevit.nn.MaskedAttention`, in place.

In the manner of ToMe's ``tome.patch.timm`` (Bolya et al., ICLR 2023): one call on an
existing model, weights kept.  Only modules whose class is exactly
``timm.layers.Attention`` (the attention of the ViT family: DeiT, DeiT-III, ViT with
register tokens, qk-norm, LayerScale, ...) are swapped; any other attention (rotary,
windowed, relative-position, pooled, or a subclass with its own forward) is left
alone and listed with the reason.  New models can instead be built with the layer
injected: ``timm.create_model(name, attn_layer=MaskedAttention)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.nn as nn
from timm.layers import Attention

from ..nn.masked_attention import MaskedAttention

__all__ = ["PatchReport", "patch_attention"]

logger = logging.getLogger(__name__)


@dataclass
class PatchReport:
    """What :func:`patch_attention` did: swapped module names and the ones left alone, with why."""

    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (name, reason)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} attention module(s) for MaskedAttention"]
        lines += [f"  {name}" for name in self.swapped]
        if self.skipped:
            lines.append(f"left {len(self.skipped)} module(s) alone:")
            lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _looks_like_attention(module: nn.Module) -> bool:
    """An attention module by its class name; a block (``LayerScaleBlockClassAttn``) is not one."""
    name = type(module).__name__.lower()
    return ("attention" in name or name.endswith("attn")) and "block" not in name


def _is_inline_attention_block(module: nn.Module) -> bool:
    """A block that computes attention inside its own forward (timm's ``ParallelScalingBlock``:
    one fused projection for q, k, v and the MLP), with no attention submodule to swap."""
    return (type(module).__name__.endswith("Block") and hasattr(module, "num_heads")
            and not any(isinstance(c, (Attention, MaskedAttention)) or _looks_like_attention(c) for c in module.modules()
                        if c is not module))


def _skip_reason(module: nn.Module) -> str:
    cls = type(module)
    if isinstance(module, Attention):
        return f"{cls.__module__}.{cls.__name__} subclasses timm Attention with its own forward; not supported"
    hints = []
    for attr, what in (("rope", "rotary position embedding"), ("window_size", "windowed attention"),
                       ("relative_position_bias_table", "relative position bias"), ("rel_pos_h", "decomposed relative position"),
                       ("pool", "pooled attention")):
        if getattr(module, attr, None) is not None:  # an attribute set to None (SAM's rope) is not a feature
            hints.append(what)
    if "rope" in cls.__name__.lower() and "rotary position embedding" not in hints:
        hints.append("rotary position embedding, passed to forward")
    detail = f" ({', '.join(hints)})" if hints else ""
    return f"{cls.__module__}.{cls.__name__}{detail} is not timm.layers.Attention; not supported"


def patch_attention(model: nn.Module, *, eps: float = 1e-6, verbose: bool = False) -> nn.Module:
    """Replace every ``timm.layers.Attention`` in ``model`` by a :class:`MaskedAttention`.

    The new modules share the old ones' parameters and settings, so the model's outputs
    are unchanged until a keep mask is set (``module.keep``, or ``forward(x, keep=...)``).
    Masked attention follows DynamicViT, ``Ã = (exp(P − m) G + eps/N) / (Σ exp(P − m) G + eps)``.

    Args:
        model: any ``nn.Module`` (typically a timm model); modified in place.
        eps: the masked-softmax stabiliser of the new modules.
        verbose: also print the report (it is always logged at INFO level).

    Returns:
        ``model``, with the :class:`PatchReport` in ``model.sparsevit_patch_report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, MaskedAttention):
                report.skipped.append((full, "already MaskedAttention"))
            elif type(child) is Attention:
                setattr(parent, child_name, MaskedAttention.from_attention(child, eps=eps))
                report.swapped.append(full)
            elif _looks_like_attention(child):
                report.skipped.append((full, _skip_reason(child)))
            elif _is_inline_attention_block(child):
                cls = type(child)
                report.skipped.append((full, f"{cls.__module__}.{cls.__name__} computes its attention inside the block "
                                             "(parallel attention + MLP, fused projections): no Attention module to swap; "
                                             "not supported"))
    if type(model) is Attention:
        report.skipped.append(("<root>", "the model itself is an Attention; wrap it or use MaskedAttention.from_attention"))
    model.sparsevit_patch_report = report
    logger.info("%s", report)
    if verbose:
        print(report)
    return model
