"""BlockSparseLayout and BlockSparseMatrix: construction, BSR/BSC index, checks, hashing."""

from __future__ import annotations

import pickle

import pytest
import torch

from sparsevit import BlockSparseLayout, BlockSparseMatrix
from helpers import CUDA

DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def _mask(mb: int, kb: int, p: float = 0.5, device: str = "cpu") -> torch.Tensor:
    return torch.rand(mb, kb, device=device) < p


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (6, 2), (4, 4)])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_from_mask_matches_torch_bsr_bsc(device: str, shape: tuple, block_size: int) -> None:
    """The index tensors equal those of torch's own CSR/CSC of the block mask."""
    mask = _mask(*shape, device=device)
    mask[0] = False  # an empty block row
    mask[:, -1] = False  # an empty block column
    layout = BlockSparseLayout.from_mask(mask, block_size).validate()
    assert layout.shape == (shape[0] * block_size, shape[1] * block_size)
    assert layout.nnz_blocks == int(mask.sum())
    assert layout.density == pytest.approx(mask.float().mean().item())
    assert torch.equal(layout.to_mask(), mask)
    for t in layout.index_tensors():
        assert t.dtype == torch.int32 and t.device.type == device
    # Ordinals of the kept blocks in row-major order, as a dense (mb, kb) map.
    ordinal = torch.zeros(shape, device=device)
    ordinal[mask] = torch.arange(1, layout.nnz_blocks + 1, device=device, dtype=torch.float)
    csr = ordinal.to_sparse_csr()
    assert torch.equal(layout.row_offsets.long(), csr.crow_indices())
    assert torch.equal(layout.col_indices.long(), csr.col_indices())
    csc = ordinal.to_sparse_csc()
    assert torch.equal(layout.col_offsets.long(), csc.ccol_indices())
    assert torch.equal(layout.bsc_row_indices.long(), csc.row_indices())
    # bsc_perm points from column-major order into the packed (row-major) blocks.
    assert torch.equal(layout.bsc_perm.long() + 1, csc.values().long())
    rows = torch.repeat_interleave(torch.arange(shape[0], device=device), csr.crow_indices().diff())
    assert torch.equal(layout.row_indices.long(), rows)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_from_dense_keeps_largest_blocks(sparsity: float, norm: str) -> None:
    w = torch.randn(64, 96)
    layout = BlockSparseLayout.from_dense(w, 16, sparsity, norm=norm)
    n = 4 * 6
    assert layout.nnz_blocks == n - round(sparsity * n)
    norms = BlockSparseLayout.block_norms(w, 16, norm)
    mask = layout.to_mask()
    if 0 < layout.nnz_blocks < n:
        assert norms[mask].min() >= norms[~mask].max()


def test_l1_and_l2_differ() -> None:
    """One block with a single large entry (L2 wins), one with many medium ones (L1 wins)."""
    w = torch.zeros(16, 32)
    w[0, 0] = 3.0  # block 0: L2 = 3, L1 = 3
    w[:, 16:] = 0.05  # block 1: L2 = 0.8, L1 = 12.8
    assert BlockSparseLayout.from_dense(w, 16, 0.5, "l2").to_mask().tolist() == [[True, False]]
    assert BlockSparseLayout.from_dense(w, 16, 0.5, "l1").to_mask().tolist() == [[False, True]]


def test_random_count_and_seed() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = BlockSparseLayout.random((128, 64), 16, 0.6, generator=g1)
    b = BlockSparseLayout.random((128, 64), 16, 0.6, generator=g2)
    assert a.nnz_blocks == 32 - round(0.6 * 32) and a == b and hash(a) == hash(b)
    assert BlockSparseLayout.random((32, 32), 16, 1.0).nnz_blocks == 0
    assert BlockSparseLayout.dense((32, 48), 16).density == 1.0


def test_immutable_hashable_picklable() -> None:
    layout = BlockSparseLayout.random((64, 64), 32, 0.5)
    with pytest.raises(AttributeError, match="immutable"):
        layout.block_size = 16
    with pytest.raises(AttributeError, match="immutable"):
        layout.col_indices = layout.col_indices
    copy = BlockSparseLayout.from_mask(layout.to_mask().clone(), 32)
    assert copy == layout and hash(copy) == hash(layout) and {layout: 1}[copy] == 1
    other = BlockSparseLayout.from_mask(~layout.to_mask(), 32)
    assert other != layout
    assert BlockSparseLayout.from_mask(layout.to_mask(), 16) != layout  # block size matters
    assert pickle.loads(pickle.dumps(layout)) == layout


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: BlockSparseLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), 24), ValueError, "block_size must be one of"),
        (lambda: BlockSparseLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), 16.0), TypeError, "block_size must be an int"),
        (lambda: BlockSparseLayout.from_mask(torch.ones(2, 2), 16), TypeError, "mask must be a bool"),
        (lambda: BlockSparseLayout.from_mask(torch.ones(2, dtype=torch.bool), 16), ValueError, "mask must have 2 dims"),
        (lambda: BlockSparseLayout.from_dense(torch.randn(40, 32), 16, 0.5), ValueError, "multiple of block_size=16"),
        (lambda: BlockSparseLayout.from_dense(torch.randn(32, 32), 16, 1.5), ValueError, r"sparsity must lie in \[0, 1\]"),
        (lambda: BlockSparseLayout.from_dense(torch.randn(32, 32), 16, 0.5, "l3"), ValueError, "norm must be"),
        (lambda: BlockSparseLayout.random((32, 0), 16, 0.5), ValueError, "positive"),
        (lambda: BlockSparseLayout.random((32, 48, 2), 16, 0.5), ValueError, "pair"),
    ],
)
def test_bad_arguments(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


def test_validate_catches_corruption() -> None:
    good = BlockSparseLayout.from_mask(torch.tensor([[True, False], [True, True]]), 16)
    idx = good.index_tensors()
    bad_cols = idx[1].clone()
    bad_cols[0] = 7
    with pytest.raises(ValueError, match="col_indices must lie"):
        BlockSparseLayout((32, 32), 16, idx[0], bad_cols, *idx[2:]).validate()
    bad_perm = idx[5].flip(0)
    with pytest.raises(ValueError, match="bsc_perm is inconsistent"):
        BlockSparseLayout((32, 32), 16, *idx[:5], bad_perm).validate()
    with pytest.raises(ValueError, match="must be int32"):
        BlockSparseLayout((32, 32), 16, idx[0].long(), *idx[1:]).validate()
    with pytest.raises(ValueError, match="row_offsets must have 3 entries"):
        BlockSparseLayout((32, 32), 16, idx[0][:2], *idx[1:]).validate()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matrix_dense_round_trip_and_transpose(dtype: torch.dtype) -> None:
    dense = torch.randn(48, 32, dtype=dtype)
    mat = BlockSparseMatrix.from_dense(dense, block_size=16, sparsity=0.5)
    mask = mat.layout.to_mask().repeat_interleave(16, 0).repeat_interleave(16, 1)
    torch.testing.assert_close(mat.to_dense(), dense * mask, atol=0, rtol=0)
    t = mat.t()
    assert t.shape == (32, 48) and t.values.data_ptr() == mat.values.data_ptr()
    torch.testing.assert_close(t.to_dense(), (dense * mask).t(), atol=0, rtol=0)
    assert t.t().transposed is False
    again = BlockSparseMatrix.from_dense(mat.to_dense(), mat.layout)
    torch.testing.assert_close(again.values, mat.values, atol=0, rtol=0)


def test_matrix_errors() -> None:
    layout = BlockSparseLayout.random((32, 32), 16, 0.5)
    with pytest.raises(ValueError, match=r"values must be \(nnz_blocks, b, b\)"):
        BlockSparseMatrix(torch.randn(3, 16, 16), layout)
    with pytest.raises(TypeError, match="layout must be a BlockSparseLayout"):
        BlockSparseMatrix(torch.randn(2, 16, 16), "layout")
    with pytest.raises(ValueError, match="either layout, or block_size and sparsity"):
        BlockSparseMatrix.from_dense(torch.randn(32, 32))
    with pytest.raises(ValueError, match="dense has shape"):
        BlockSparseMatrix.from_dense(torch.randn(32, 48), layout)


# -- one validation point: layouts from user index tensors --------------------------------
def _index(mask: torch.Tensor) -> list[torch.Tensor]:
    return BlockSparseLayout.from_mask(mask, 16).index_tensors()


_MASK = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, False, False]])


def _swap(t: torch.Tensor, i: int, j: int) -> torch.Tensor:
    t = t.clone()
    t[[i, j]] = t[[j, i]]
    return t


@pytest.mark.parametrize(
    "position, corrupt, match",
    [
        (1, lambda t: t.index_fill(0, torch.tensor([0]), 1000), r"col_indices must lie in \[0, 4\)"),
        (1, lambda t: t.index_fill(0, torch.tensor([2]), -3), r"col_indices must lie in \[0, 4\)"),
        (2, lambda t: t.index_fill(0, torch.tensor([0]), 7), r"row_indices must lie in \[0, 3\)"),
        (1, lambda t: _swap(t, 0, 1), "col_indices is inconsistent"),  # row 0 unsorted
        (1, lambda t: t.index_fill(0, torch.tensor([1]), 1), "distinct"),  # duplicate block (0, 1)
        (0, lambda t: t.index_fill(0, torch.tensor([1]), 1), "row_offsets is inconsistent"),
        (3, lambda t: t.index_fill(0, torch.tensor([4]), 3), "col_offsets is inconsistent"),
        (4, lambda t: _swap(t, 0, 1), "bsc_row_indices is inconsistent"),
        (5, lambda t: _swap(t, 0, 1), "bsc_perm is inconsistent"),
        (5, lambda t: t.long(), "bsc_perm must be int32"),
        (1, lambda t: t.float(), "col_indices must be int32"),
        (4, lambda t: t[:-1], "bsc_row_indices must have 4 entries"),
        (3, lambda t: t.to("meta"), "col_offsets must be on cpu"),
    ],
)
def test_constructor_validates_user_index(position: int, corrupt, match: str) -> None:
    """Before: the constructor wrapped any index as it was; only an explicit validate() checked it."""
    idx = _index(_MASK)
    idx[position] = corrupt(idx[position])
    with pytest.raises(ValueError, match=match):
        BlockSparseLayout((48, 64), 16, *idx)


def test_constructor_makes_index_contiguous() -> None:
    """Kernels read the index with unit stride: a strided view is copied, never passed on."""
    idx = _index(_MASK)
    strided = torch.stack([idx[1], idx[1]], 1)[:, 0]
    assert not strided.is_contiguous()
    layout = BlockSparseLayout((48, 64), 16, idx[0], strided, *idx[2:])
    assert all(t.is_contiguous() for t in layout.index_tensors())
    assert torch.equal(layout.to_mask(), _MASK)


def test_good_user_index_and_pickle_round_trip() -> None:
    idx = _index(_MASK)
    layout = BlockSparseLayout((48, 64), 16, *idx)
    assert torch.equal(layout.to_mask(), _MASK) and layout == BlockSparseLayout.from_mask(_MASK, 16)
    assert pickle.loads(pickle.dumps(layout)) == layout
    empty = BlockSparseLayout.from_mask(torch.zeros(2, 2, dtype=torch.bool), 16)
    assert BlockSparseLayout((32, 32), 16, *empty.index_tensors()).nnz_blocks == 0


def test_unpickling_a_corrupted_layout_is_refused() -> None:
    """A layout read back from disk goes through the same validation."""
    idx = _index(_MASK)
    idx[1] = idx[1].index_fill(0, torch.tensor([0]), 1000)
    blob = pickle.dumps((BlockSparseLayout, ((48, 64), 16, *idx)))
    cls, args = pickle.loads(blob)
    with pytest.raises(ValueError, match="col_indices must lie"):
        cls(*args)


def test_matrix_checks_values_dtype() -> None:
    layout = BlockSparseLayout.from_mask(_MASK, 16)
    with pytest.raises(TypeError, match="values must be a floating-point tensor"):
        BlockSparseMatrix(torch.ones(4, 16, 16, dtype=torch.int32), layout)
