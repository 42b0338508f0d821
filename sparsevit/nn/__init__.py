"""Modules of sparsevit: drop-in layers for Vision Transformers."""

from .masked_attention import MaskedAttention

__all__ = ["MaskedAttention"]
