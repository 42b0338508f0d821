"""dds / dsd / sdd against the masked dense reference, forward and every gradient, every backend.

Accuracy rule: fp32 within the fp32 tolerances; fp16/bf16 no more than 2x the error of
PyTorch's own same-dtype matmul (the reference run in that dtype), both measured
against the reference in float64.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import sparsevit
from sparsevit import BlockSparseLayout, BlockSparseMatrix, reference
from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
from helpers import DTYPES, backend_params, device_for, require_backend, tolerances

BS = 16


def _layout(mb: int, kb: int, dev: torch.device, kind: str = "mixed", block_size: int = BS) -> BlockSparseLayout:
    """A layout of mb x kb blocks; ``mixed`` forces an empty block row and column."""
    if kind == "dense":
        mask = torch.ones(mb, kb, dtype=torch.bool)
    elif kind == "empty":
        mask = torch.zeros(mb, kb, dtype=torch.bool)
    elif kind == "single":
        mask = torch.zeros(mb, kb, dtype=torch.bool)
        mask[mb - 1, kb // 2] = True
    else:  # an empty first block row and last block column; BSC order != BSR order
        i = torch.arange(mb)[:, None]
        j = torch.arange(kb)[None, :]
        mask = (i > 0) & (j < kb - 1) & ((i * j) % 3 != 1)
    return BlockSparseLayout.from_mask(mask.to(dev), block_size)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, stored with the last two dims swapped (a transposed view)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _check(name: str, got: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == exact.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    if dtype == torch.float32:  # fp32 tolerances, atol relative to the output's scale
        tol = tolerances(dtype)
        scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
        torch.testing.assert_close(got.double(), exact, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    base = (same_dtype.double() - exact).abs().max().item() if exact.numel() else 0.0
    floor = torch.finfo(dtype).eps * (exact.abs().max().item() if exact.numel() else 0.0)
    assert err <= 2 * max(base, floor), f"{name}: error {err:.3g} > 2 x torch's {base:.3g} (floor {floor:.3g})"


def _run_case(
    op: Callable, ref: Callable, inputs: list[torch.Tensor], dtype: torch.dtype
) -> None:
    """``op`` and ``ref`` take the same leaf tensors; compare outputs and all gradients."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = op(*leaves)
    same = [t.detach().clone().requires_grad_() for t in leaves]
    out_same = ref(*same)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    out_exact = ref(*exact)
    _check("out", out, out_same.detach(), out_exact.detach(), dtype)
    grad = torch.randn_like(out_exact)
    out.backward(grad.to(dtype))
    out_same.backward(grad.to(dtype))
    out_exact.backward(grad)
    for i, (g, s, e) in enumerate(zip(leaves, same, exact)):
        _check(f"grad[{i}]", g.grad, s.grad, e.grad, dtype)


def _dense_mask(layout: BlockSparseLayout) -> torch.Tensor:
    b = layout.block_size
    return layout.to_mask().repeat_interleave(b, 0).repeat_interleave(b, 1)


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["B=S", "B=St"])
def test_dds(backend: str, dtype: torch.dtype, transposed: bool) -> None:
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(3, 4, dev)  # S is (48, 64)
    m, k = layout.shape
    q = k if transposed else m
    a = _noncontiguous(torch.randn(2, 5, q, device=dev))  # batch dims, P=5 not a tile multiple
    values = torch.randn(layout.nnz_blocks, BS, BS, device=dev)

    def op(a, v):
        mat = BlockSparseMatrix(v, layout)
        return sparsevit.dds(a, mat.t() if transposed else mat, backend=backend)

    def ref(a, v):
        return reference.dds(a, v, layout.row_indices, layout.col_indices, layout.shape, transposed)

    _run_case(op, ref, [a, values], dtype)


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["A=S", "A=St"])
def test_dsd(backend: str, dtype: torch.dtype, transposed: bool) -> None:
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(4, 3, dev)  # S is (64, 48)
    m, k = layout.shape
    q = m if transposed else k
    b = _noncontiguous(torch.randn(2, q, 7, device=dev))  # N=7 not a tile multiple
    values = torch.randn(layout.nnz_blocks, BS, BS, device=dev)

    def op(v, b):
        mat = BlockSparseMatrix(v, layout)
        return sparsevit.dsd(mat.t() if transposed else mat, b, backend=backend)

    def ref(v, b):
        return reference.dsd(v, layout.row_indices, layout.col_indices, layout.shape, b, transposed)

    _run_case(op, ref, [values, b], dtype)


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdd(backend: str, dtype: torch.dtype) -> None:
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(3, 4, dev)
    m, n = layout.shape
    a = torch.randn(2, 9, m, device=dev).transpose(-1, -2)  # (2, M, R) as a transposed view
    b = torch.randn(2, 9, n, device=dev)

    def op(a, b):
        return sparsevit.sdd(a, b, layout, backend=backend).values

    def ref(a, b):
        return reference.sdd(a, b, layout.row_indices, layout.col_indices, BS)

    _run_case(op, ref, [a, b], dtype)


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("kind", ["dense", "empty", "single"])
def test_special_layouts(backend: str, kind: str) -> None:
    """Sparsity 0 and 1 and a single block, through all three products (fp32)."""
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(2, 2, dev, kind)
    values = torch.randn(layout.nnz_blocks, BS, BS, device=dev)
    args = (layout.row_indices, layout.col_indices, layout.shape)
    a = torch.randn(3, 32, device=dev)
    _run_case(
        lambda a, v: sparsevit.dds(a, BlockSparseMatrix(v, layout), backend=backend),
        lambda a, v: reference.dds(a, v, *args), [a, values], torch.float32,
    )
    _run_case(
        lambda v, b: sparsevit.dsd(BlockSparseMatrix(v, layout).t(), b, backend=backend),
        lambda v, b: reference.dsd(v, *args, b, True), [values, a.t()], torch.float32,
    )
    _run_case(
        lambda a, b: sparsevit.sdd(a, b, layout, backend=backend).values,
        lambda a, b: reference.sdd(a, b, layout.row_indices, layout.col_indices, BS), [a.t(), a], torch.float32,
    )
    out = sparsevit.dds(a, BlockSparseMatrix(values, layout), backend=backend)
    zero_cols = ~_dense_mask(layout).any(0)  # columns of S without blocks: written as zeros
    if zero_cols.any():
        assert out[:, zero_cols].abs().max().item() == 0


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_block_size_32(backend: str, dtype: torch.dtype) -> None:
    """A larger block (several tiles per block under the interpreter's config)."""
    require_backend(backend)
    dev = device_for(backend)
    layout = _layout(2, 2, dev, block_size=32)
    values = torch.randn(layout.nnz_blocks, 32, 32, device=dev)
    x = torch.randn(19, 64, device=dev)
    args = (layout.row_indices, layout.col_indices, layout.shape)
    _run_case(
        lambda x, v: sparsevit.dds(x, BlockSparseMatrix(v, layout).t(), backend=backend),
        lambda x, v: reference.dds(x, v, *args, True), [x, values], dtype,
    )


def test_sdd_matches_full_product_on_dense_layout() -> None:
    """An independent check of the reference itself: dense layout == plain summed matmul."""
    layout = BlockSparseLayout.dense((32, 48), 16)
    a, b = torch.randn(3, 32, 5, dtype=torch.float64), torch.randn(3, 5, 48, dtype=torch.float64)
    got = BlockSparseMatrix(sparsevit.sdd(a.float(), b.float(), layout).values, layout).to_dense()
    torch.testing.assert_close(got.double(), (a @ b).sum(0), atol=1e-5, rtol=1e-5)
    dense = torch.randn(48, 32)
    mat = BlockSparseMatrix.from_dense(dense, BlockSparseLayout.dense((48, 32), 16))
    torch.testing.assert_close(sparsevit.dds(a[0].float().t(), mat.t()), a[0].float().t() @ dense.t())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_gpu_vit_like_shapes(backend: str, dtype: torch.dtype, block_size: int) -> None:
    """Every product with ViT-like token counts (197 per image) at the real block sizes."""
    require_backend(backend)
    dev = torch.device("cuda")
    layout = BlockSparseLayout.random((256, 384), block_size, 0.5, device=dev)
    args = (layout.row_indices, layout.col_indices, layout.shape)
    values = torch.randn(layout.nnz_blocks, block_size, block_size, device=dev)
    x = torch.randn(3, 197, 384, device=dev)
    _run_case(
        lambda x, v: sparsevit.dds(x, BlockSparseMatrix(v, layout).t(), backend=backend),
        lambda x, v: reference.dds(x, v, *args, True), [x, values], dtype,
    )
    b = torch.randn(2, 384, 197, device=dev)
    _run_case(
        lambda v, b: sparsevit.dsd(BlockSparseMatrix(v, layout), b, backend=backend),
        lambda v, b: reference.dsd(v, *args, b), [values, b], dtype,
    )
    a = torch.randn(3, 197, 256, device=dev)
    _run_case(
        lambda a, x: sparsevit.sdd(a.mT, x, layout, backend=backend).values,
        lambda a, x: reference.sdd(a.mT, x, layout.row_indices, layout.col_indices, block_size), [a, x], dtype,
    )
