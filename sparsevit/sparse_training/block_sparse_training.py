"""Sparse training on block-sparse kernels: block-masked Linears compute only their kept blocks.

``train_block_sparse(manager)`` makes every block-masked ``nn.Linear`` of a
:class:`~sparsevit.sparse_training.masks.MaskManager` (RigL, SET, static, lottery
tickets) compute ``y = x Wᵀ + b`` with :func:`sparsevit.dds` over the kept ``b × b``
blocks of its current mask, so forward and backward (``dW`` by ``sdd``, scattered into
the dense gradient's kept blocks) do ``density`` of the dense work.  The weight stays a
dense ``nn.Parameter`` (optimizer state, checkpoints and the manager's invariants are
unchanged: the masked entries are zero anyway), and the layer's class becomes
:class:`BlockSparseTrainedLinear`, a subclass of ``nn.Linear`` with the same state dict.

On the steps where RigL needs the dense gradient (``manager.collect_dense_grads``),
the layer runs the dense ``F.linear`` instead, so growth sees ``∂L/∂W`` everywhere.
The block layout is rebuilt only when the manager changes the mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference
from ..block_sparse import BlockSparseMatrix
from ..layout import BlockSparseLayout
from ..ops import dds
from ..ops.block_sparse_matmul import autocast_operands
from .block_sparse import BlockSparseReport
from .masks import MaskedWeight, MaskManager

__all__ = ["BlockSparseTrainedLinear", "train_block_sparse"]


class BlockSparseTrainedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs on the kept blocks of its manager's block mask.

    ``y = dds(x, S(W)ᵀ) + b`` with ``S(W)`` the kept blocks of ``W``; dense ``F.linear``
    on the manager's dense-gradient steps. Created by :func:`train_block_sparse`.
    """

    _sparsevit_manager: MaskManager
    _sparsevit_layer: MaskedWeight
    _sparsevit_backend: Optional[str]

    def current_layout(self) -> BlockSparseLayout:
        """The layout of the layer's current block mask (cached until the mask changes)."""
        mask = self._sparsevit_layer.mask
        cached = getattr(self, "_sparsevit_cache", None)
        if cached is None or cached[0] is not mask:
            layout = BlockSparseLayout.from_mask(mask, self._sparsevit_layer.block_size)
            self._sparsevit_cache = (mask, layout)
        return self._sparsevit_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x Wᵀ + b`` as ``nn.Linear``: x (..., in_features) or (in_features,).

        Under ``torch.autocast`` the input, weight and bias are cast to the autocast
        dtype first, as autocast does for ``F.linear``, so the output has that dtype
        (also for an fp32 input) and the fp32 weight gets an fp32 gradient.
        """
        if self._sparsevit_manager.collect_dense_grads and torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"x must be a tensor (..., {self.in_features}) or ({self.in_features},), got {x!r}")
        a = x if x.dim() >= 2 else x.unsqueeze(0)  # nn.Linear takes a single vector too
        a, weight, bias = autocast_operands(a.device, a, self.weight, self.bias)
        layout = self.current_layout()
        values = reference.dense_to_block_sparse(weight, layout.row_indices, layout.col_indices, layout.block_size)
        y = dds(a, BlockSparseMatrix(values, layout).t(), backend=self._sparsevit_backend)
        if bias is not None:
            y = y + bias
        return y if x.dim() >= 2 else y.squeeze(0)


def train_block_sparse(manager: MaskManager, backend: Optional[str] = None) -> BlockSparseReport:
    """Route the block-masked ``nn.Linear`` layers of ``manager`` through block-sparse kernels.

    Args:
        manager: the :class:`MaskManager` (``rigl.manager``, ``ticket.manager``).
        backend: backend of the block-sparse products (None: automatic).

    Returns:
        a :class:`BlockSparseReport` of the layers routed and those left dense, with why.

    Raises:
        ValueError for FSDP2-sharded weights (see :meth:`MaskManager.refuse_sharded`).
    """
    if not isinstance(manager, MaskManager):
        raise TypeError(f"manager must be a MaskManager, got {type(manager).__name__}")
    manager.refuse_sharded("train_block_sparse")
    report = BlockSparseReport(target="BlockSparseTrainedLinear", new_parameters=False)
    for name, layer in manager.layers.items():
        module = layer.module
        if layer.block_size is None:
            report.skipped.append((name, "element granularity: no block structure to run block-sparse"))
            continue
        if type(module) not in (nn.Linear, BlockSparseTrainedLinear):
            report.skipped.append((name, f"{type(module).__name__} is not an nn.Linear"))
            continue
        module.__class__ = BlockSparseTrainedLinear
        module._sparsevit_manager = manager
        module._sparsevit_layer = layer
        module._sparsevit_backend = backend
        report.converted.append((name, layer.density()))
    return report
