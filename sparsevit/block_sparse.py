"""BlockSparseMatrix: packed ``(nnz, b, b)`` blocks on a :class:`BlockSparseLayout`.

The matrix is ``S`` (the layout's ``(M, K)`` pattern) or, after :meth:`t`, ``Sᵀ``: the
transpose is a flag read through the layout's BSC index by the kernels, never a copy
of the values.  The values may require grad; every product of
:mod:`sparsevit.ops.block_sparse_matmul` differentiates with respect to them.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .layout import BlockSparseLayout

__all__ = ["BlockSparseMatrix"]


class BlockSparseMatrix:
    """A block-sparse matrix: ``values (nnz, b, b)`` on ``layout``, optionally transposed.

    ``shape`` is ``layout.shape`` (or its reverse when ``transposed``).  Construct
    with ``BlockSparseMatrix(values, layout)`` or :meth:`from_dense`.  The layout was
    checked when it was built (see :mod:`sparsevit.layout`); the values must be a
    floating-point ``(nnz_blocks, b, b)`` tensor on the layout's device.
    """

    __slots__ = ("values", "layout", "transposed")

    def __init__(self, values: torch.Tensor, layout: BlockSparseLayout, transposed: bool = False) -> None:
        if not isinstance(layout, BlockSparseLayout):
            raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor (nnz, b, b), got {type(values).__name__}")
        if not values.is_floating_point():
            raise TypeError(f"values must be a floating-point tensor (nnz, b, b), got {values.dtype}")
        b = layout.block_size
        if tuple(values.shape) != (layout.nnz_blocks, b, b):
            raise ValueError(
                f"values must be (nnz_blocks, b, b) = {(layout.nnz_blocks, b, b)} for {layout}, got {tuple(values.shape)}"
            )
        if values.device != layout.device:
            raise ValueError(f"values ({values.device}) and layout ({layout.device}) must be on the same device")
        self.values = values
        self.layout = layout
        self.transposed = bool(transposed)

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        layout: Optional[BlockSparseLayout] = None,
        *,
        block_size: Optional[int] = None,
        sparsity: Optional[float] = None,
        norm: str = "l2",
    ) -> "BlockSparseMatrix":
        """The blocks of ``dense (M, K)`` kept by ``layout``, or by the block-magnitude layout
        :meth:`BlockSparseLayout.from_dense` ``(dense, block_size, sparsity, norm)``.

        ``values[t] = dense[i·b:(i+1)·b, j·b:(j+1)·b]`` for the ``t``-th kept block ``(i, j)``
        (differentiable in ``dense``).
        """
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense must be a torch.Tensor (M, K), got {type(dense).__name__}")
        if dense.dim() != 2:
            raise ValueError(f"dense must be a 2-D tensor (M, K), got shape {tuple(dense.shape)}")
        if not dense.is_floating_point():
            raise TypeError(f"dense must be a floating-point tensor (float32, float16 or bfloat16 for the block-sparse "
                            f"products; float64 for the reference), got {dense.dtype}; convert it first, e.g. dense.float()")
        if layout is None:
            if block_size is None or sparsity is None:
                raise ValueError("give either layout, or block_size and sparsity")
            layout = BlockSparseLayout.from_dense(dense, block_size, sparsity, norm)
        elif block_size is not None or sparsity is not None:
            raise ValueError("give either layout, or block_size and sparsity, not both")
        if tuple(dense.shape) != layout.shape:
            raise ValueError(f"dense has shape {tuple(dense.shape)} but the layout is {layout.shape}")
        values = reference.dense_to_block_sparse(dense, layout.row_indices, layout.col_indices, layout.block_size)
        return cls(values.contiguous(), layout)

    @property
    def shape(self) -> tuple[int, int]:
        m, k = self.layout.shape
        return (k, m) if self.transposed else (m, k)

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def t(self) -> "BlockSparseMatrix":
        """The transpose, sharing ``values`` and ``layout`` (no copy)."""
        return BlockSparseMatrix(self.values, self.layout, not self.transposed)

    @property
    def T(self) -> "BlockSparseMatrix":  # noqa: N802 - mirrors torch.Tensor.T
        return self.t()

    def to_dense(self) -> torch.Tensor:
        """The dense matrix of :attr:`shape` (zeros outside the kept blocks; differentiable)."""
        lay = self.layout
        dense = reference.block_sparse_to_dense(self.values, lay.row_indices, lay.col_indices, lay.shape)
        return dense.t() if self.transposed else dense

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={self.shape}, block_size={self.block_size}, nnz_blocks={self.layout.nnz_blocks}, "
            f"density={self.layout.density:.3f}, dtype={self.dtype}, transposed={self.transposed})"
        )
