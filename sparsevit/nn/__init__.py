"""Modules of sparsevit: drop-in sparse replacements for ViT layers."""

from .block_sparse_linear import BlockSparseLinear
from .convert import ConversionReport, sparsify_linears

__all__ = ["BlockSparseLinear", "ConversionReport", "sparsify_linears"]
