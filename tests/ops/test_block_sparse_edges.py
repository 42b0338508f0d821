"""Block-sparse products at the edges: empty dims, batches past the grid limit, autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsevit
from sparsevit import BlockSparseLayout, BlockSparseMatrix, reference
from sparsevit.nn import BlockSparseLinear
from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
from helpers import backend_params, device_for, require_backend

BS = 16


def _layout(dev: torch.device) -> BlockSparseLayout:
    """(32, 48): an empty block column and a full block row."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    return BlockSparseLayout.from_mask(mask.to(dev), BS)


def _values(layout: BlockSparseLayout, dev: torch.device) -> torch.Tensor:
    return torch.randn(layout.nnz_blocks, BS, BS, device=dev)


def _args(layout: BlockSparseLayout) -> tuple:
    return layout.row_indices, layout.col_indices, layout.shape


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("batch", [(), (2,), (0,), (2, 3)], ids=str)
def test_sdd_zero_length_contraction(backend: str, batch: tuple) -> None:
    """R = 0 (or no batch): every kept block is the empty sum, zero; the gradients are empty."""
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(dev)
    m, n = layout.shape
    for r in (0, 5) if batch == (0,) else (0,):
        a = torch.randn(*batch, m, r, device=dev, requires_grad=True)
        b = torch.randn(*batch, r, n, device=dev, requires_grad=True)
        values = sparsevit.sdd(a, b, layout, backend=backend).values
        assert values.shape == (layout.nnz_blocks, BS, BS)
        assert torch.equal(values, torch.zeros_like(values))
        torch.testing.assert_close(values, reference.sdd(a, b, layout.row_indices, layout.col_indices, BS), atol=0, rtol=0)
        ga, gb = torch.autograd.grad(values, [a, b], torch.randn_like(values))
        assert ga.shape == a.shape and gb.shape == b.shape


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("tokens", [(0,), (2, 0), (0, 3)], ids=str)
def test_dds_backward_with_zero_tokens(backend: str, tokens: tuple) -> None:
    """x @ Sᵀ with no tokens: an empty output, dS = Σ over no tokens = 0 (sdd with R = 0)."""
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(dev)
    a = torch.randn(*tokens, layout.shape[1], device=dev, requires_grad=True)
    values = _values(layout, dev).requires_grad_()
    out = sparsevit.dds(a, BlockSparseMatrix(values, layout).t(), backend=backend)
    assert out.shape == (*tokens, layout.shape[0])
    out.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values)) and a.grad.shape == a.shape


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
def test_block_sparse_linear_backward_with_zero_tokens(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    layer = BlockSparseLinear.from_dense(nn.Linear(48, 32).to(dev), block_size=BS, sparsity=0.5, backend=backend)
    x = torch.randn(2, 0, 48, device=dev, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 32)
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("transposed", [False, True], ids=["A=S", "A=St"])
@pytest.mark.parametrize("batch", [(), (3,), (0,)], ids=str)
def test_dsd_zero_columns(backend: str, transposed: bool, batch: tuple) -> None:
    """S @ b with N = 0 columns (PyTorch's BSR tests with n = 0): empty output and gradient of b,
    zero gradient of the values."""
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(dev)
    m, k = layout.shape
    values = _values(layout, dev).requires_grad_()
    b = torch.randn(*batch, m if transposed else k, 0, device=dev, requires_grad=True)
    mat = BlockSparseMatrix(values, layout)
    out = sparsevit.dsd(mat.t() if transposed else mat, b, backend=backend)
    assert out.shape == (*batch, k if transposed else m, 0)
    torch.testing.assert_close(out, reference.dsd(values, *_args(layout), b, transposed), atol=0, rtol=0)
    gv, gb = torch.autograd.grad(out, [values, b], torch.randn_like(out))
    assert torch.equal(gv, torch.zeros_like(values)) and gb.shape == b.shape


def test_batch_past_the_grid_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch over grid axis 1's limit runs in chunks (here a limit of 2 for a batch of 5)."""
    from sparsevit.kernels import block_sparse_matmul as kernels

    monkeypatch.setattr(kernels, "MAX_GRID_DIM", 2)
    batches = []
    launch = kernels._launch_dds

    def spy(values, offsets, indices, perm, transpose_blocks, a, out):
        batches.append(out.shape[0])
        return launch(values, offsets, indices, perm, transpose_blocks, a, out)

    monkeypatch.setattr(kernels, "_launch_dds", spy)
    dev = device_for("triton")
    layout = _layout(dev)
    m, k = layout.shape
    values = _values(layout, dev)
    b = torch.randn(5, k, 7, device=dev)
    torch.testing.assert_close(
        sparsevit.dsd(BlockSparseMatrix(values, layout), b, backend="triton"),
        reference.dsd(values, *_args(layout), b), atol=1e-5, rtol=1e-4,
    )
    a = torch.randn(5, k, 3, device=dev).transpose(1, 2)  # not foldable into rows: a batch of 5
    torch.testing.assert_close(
        sparsevit.dds(a, BlockSparseMatrix(values, layout).t(), backend="triton"),
        reference.dds(a, values, *_args(layout), True), atol=1e-5, rtol=1e-4,
    )
    assert batches == [2, 2, 1, 2, 2, 1]


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_products_follow_autocast_like_matmul(backend: str, dtype: torch.dtype) -> None:
    """Under autocast the products cast their operands as ``torch.matmul`` does: the output has
    the autocast dtype whatever the input dtypes, and fp32 leaves get fp32 gradients."""
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(dev)
    m, k = layout.shape
    values = _values(layout, dev).requires_grad_()
    x = torch.randn(3, 5, k, device=dev, dtype=dtype, requires_grad=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        y = sparsevit.dds(x, BlockSparseMatrix(values, layout).t(), backend=backend)
        z = sparsevit.dsd(BlockSparseMatrix(values, layout), x.mT, backend=backend)
        s = sparsevit.sdd(x.mT[..., :m, :], x, layout, backend=backend).values
        want = x @ reference.block_sparse_to_dense(values, *_args(layout)).t()
    assert y.dtype == z.dtype == s.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), atol=5e-2, rtol=2e-2)
    (y.float().sum() + z.float().sum() + s.float().sum()).backward()
    assert values.grad.dtype == torch.float32 and x.grad.dtype == dtype
