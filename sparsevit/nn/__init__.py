"""Modules of sparsevit: drop-in sparse replacements for ViT layers."""

from .block_sparse_linear import BlockSparseLinear
from .convert import ConversionReport, sparsify_linears
from .masked_attention import MaskedAttention

__all__ = ["BlockSparseLinear", "ConversionReport", "MaskedAttention", "sparsify_linears"]
