"""torch.library.opcheck and torch.compile(fullgraph=True) through dds / dsd / sdd."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import BlockSparseLayout, BlockSparseMatrix, reference
from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
from helpers import backend_params, device_for, require_backend


def _layout(dev: torch.device) -> BlockSparseLayout:
    mask = torch.tensor([[True, False, True], [True, True, False]], device=dev)
    return BlockSparseLayout.from_mask(mask, 16)  # (32, 48)


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
def test_opcheck(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(dev)
    index = layout.index_tensors()
    values = torch.randn(layout.nnz_blocks, 16, 16, device=dev, requires_grad=True)
    a = torch.randn(2, 3, 32, device=dev, requires_grad=True)
    b = torch.randn(48, 5, device=dev, requires_grad=True)
    ops = torch.ops.sparsevit
    torch.library.opcheck(ops.dds.default, (a, values, index, False, backend))
    torch.library.opcheck(ops.dsd.default, (values, index, b, False, backend))
    c = torch.randn(2, 3, 48, device=dev, requires_grad=True)
    torch.library.opcheck(ops.sdd.default, (a.mT, c, index, 16, backend))


def _model(x: torch.Tensor, values: torch.Tensor, layout: BlockSparseLayout, backend: str) -> torch.Tensor:
    w = BlockSparseMatrix(values, layout)
    h = sparsevit.dds(x, w, backend=backend)  # (2, 3, 48)
    back = sparsevit.dsd(w, h.mT, backend=backend)  # (2, 32, 3)
    g = sparsevit.sdd(x.mT, h, layout, backend=backend)
    return h.pow(2).sum() + back.sum() + g.values.sum()


def _reference_model(x: torch.Tensor, values: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    args = (layout.row_indices, layout.col_indices, layout.shape)
    h = reference.dds(x, values, *args)
    back = reference.dsd(values, *args, h.mT)
    g = reference.sdd(x.mT, h, layout.row_indices, layout.col_indices, 16)
    return h.pow(2).sum() + back.sum() + g.sum()


COMPILERS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(backend: str, compiler: str) -> None:
    require_backend(backend)
    torch._dynamo.reset()
    dev = device_for(backend)
    layout = _layout(dev)
    x = torch.randn(2, 3, 32, device=dev, requires_grad=True)
    values = torch.randn(layout.nnz_blocks, 16, 16, device=dev, requires_grad=True)
    compiled = torch.compile(_model, fullgraph=True, backend=compiler)
    loss = compiled(x, values, layout, backend)
    grads = torch.autograd.grad(loss, (x, values))
    x_ref = x.detach().clone().requires_grad_()
    v_ref = values.detach().clone().requires_grad_()
    loss_ref = _reference_model(x_ref, v_ref, layout)
    grads_ref = torch.autograd.grad(loss_ref, (x_ref, v_ref))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
