"""BlockSparseLinear: ``y = x Wᵀ + bias`` with a block-sparse weight, fast in training too.

The sparse layer of RigL / lottery-ticket training (Evci et al., ICML 2020; Frankle &
Carbin, ICLR 2019) at block granularity: only the kept ``b × b`` blocks of
``W (out_features, in_features)`` are stored (``weight (nnz, b, b)``) and multiplied.
The forward pass is :func:`sparsevit.dds` ``(x, Wᵀ)``; its backward computes
``dx = dy W`` (dds) and ``dW = Σ dyᵀ x`` on the kept blocks only (sdd).

The layout's index tensors are buffers, so they follow ``.to(device)`` and live in
the ``state_dict``; loading a state dict with a different number of kept blocks
resizes the weight and the index buffers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..backend import choose_backend
from ..block_sparse import BlockSparseMatrix
from ..layout import BlockSparseLayout
from ..ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT, _dds_op

__all__ = ["BlockSparseLinear"]

_BUFFERS = ("row_offsets", "col_indices", "row_indices", "col_offsets", "bsc_row_indices", "bsc_perm")


class BlockSparseLinear(nn.Module):
    """A Linear layer whose weight keeps only the blocks of a :class:`BlockSparseLayout`.

    ``y = x Wᵀ + bias`` with ``W (out_features, in_features)`` zero outside the layout.

    Args:
        in_features, out_features: as in ``nn.Linear``; multiples of ``block_size``.
        layout: the ``(out_features, in_features)`` block layout, or None to draw a
            random one at ``sparsity``.
        sparsity: fraction of blocks dropped when no ``layout`` is given.
        block_size: 16, 32, 64 or 128 (taken from ``layout`` when given).
        bias: learn an additive bias.
        backend: backend of the products (None: automatic, see :mod:`sparsevit.backend`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: Optional[BlockSparseLayout] = None,
        *,
        sparsity: Optional[float] = None,
        block_size: int = 32,
        bias: bool = True,
        backend: Optional[str] = None,
        device: "torch.device | str | None" = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if layout is None:
            if sparsity is None:
                raise ValueError("give a layout or a sparsity")
            layout = BlockSparseLayout.random((out_features, in_features), block_size, sparsity, device=device)
        else:
            if not isinstance(layout, BlockSparseLayout):
                raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
            if sparsity is not None:
                raise ValueError("give a layout or a sparsity, not both")
            if layout.shape != (out_features, in_features):
                raise ValueError(f"layout shape {layout.shape} must be (out_features, in_features) = {(out_features, in_features)}")
            if device is not None:
                layout = layout.to(device)
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = layout.block_size
        self.backend = backend
        b = layout.block_size
        factory = dict(device=layout.device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(layout.nnz_blocks, b, b, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        for name, t in zip(_BUFFERS, layout.index_tensors()):
            self.register_buffer(name, t.clone())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation: U(−1/√in, 1/√in) for the kept weights and the bias."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def layout(self) -> BlockSparseLayout:
        """The current block layout (built from the index buffers)."""
        return BlockSparseLayout(
            (self.out_features, self.in_features), self.block_size, *(getattr(self, n) for n in _BUFFERS)
        )

    @property
    def density(self) -> float:
        return self.layout.density

    def sparse_weight(self) -> BlockSparseMatrix:
        """``W`` as a :class:`BlockSparseMatrix` sharing this module's parameter."""
        return BlockSparseMatrix(self.weight, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x Wᵀ + bias``: x (..., in_features) -> (..., out_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (..., {self.in_features}), got {tuple(x.shape)}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x must have the weight's dtype {self.weight.dtype}, got {x.dtype}")
        a = x if x.dim() >= 2 else x.unsqueeze(0)
        index = [getattr(self, n) for n in _BUFFERS]
        name = choose_backend(BLOCK_SPARSE_SUPPORT, [a, self.weight], self.backend)
        y = _dds_op(a, self.weight, index, True, name)  # x @ Wᵀ through the BSR index
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() >= 2 else y.squeeze(0)

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        block_size: Optional[int] = None,
        sparsity: Optional[float] = None,
        layout: Optional[BlockSparseLayout] = None,
        norm: str = "l2",
        backend: Optional[str] = None,
    ) -> "BlockSparseLinear":
        """Keep the blocks of ``linear.weight`` given by ``layout``, or the largest-norm blocks
        at ``sparsity`` (:meth:`BlockSparseLayout.from_dense`), copying values and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if layout is None:
            if block_size is None or sparsity is None:
                raise ValueError("give either layout, or block_size and sparsity")
            layout = BlockSparseLayout.from_dense(w, block_size, sparsity, norm)
        elif block_size is not None or sparsity is not None:
            raise ValueError("give either layout, or block_size and sparsity, not both")
        layout = layout.to(w.device)
        mod = cls(linear.in_features, linear.out_features, layout, bias=linear.bias is not None,
                  backend=backend, dtype=w.dtype)
        with torch.no_grad():
            mod.weight.copy_(BlockSparseMatrix.from_dense(w, layout).values)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight (zeros outside the kept blocks)."""
        w = self.sparse_weight().to_dense().detach()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # -- state dict -------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Adopt the saved layout: resize the weight and index buffers to the saved sizes."""
        for name in _BUFFERS:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        saved = state_dict.get(prefix + "weight")
        if saved is not None and saved.shape != self.weight.shape:
            self.weight = nn.Parameter(self.weight.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        lay = self.layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
            f"nnz_blocks={lay.nnz_blocks}, density={lay.density:.3f}, bias={self.bias is not None}"
        )
