"""Modules of sparsevit: drop-in sparse replacements for ViT layers.

:class:`MaskedAttention` subclasses timm's ``Attention``, so it (and timm) is imported
only when first used: ``import sparsevit`` and ``import sparsevit.nn`` do not import timm.
"""

from __future__ import annotations

from typing import Any

from .block_sparse_linear import BlockSparseLinear
from .convert import ConversionReport, sparsify_linears

__all__ = ["BlockSparseLinear", "ConversionReport", "MaskedAttention", "sparsify_linears"]


def __getattr__(name: str) -> Any:
    """PEP 562: ``sparsevit.nn.MaskedAttention`` imports timm on first access."""
    if name == "MaskedAttention":
        from .masked_attention import MaskedAttention

        return MaskedAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
