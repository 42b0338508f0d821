"""Bad input to dds / dsd / sdd: a TypeError/ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import BlockSparseLayout, BlockSparseMatrix


@pytest.fixture
def mat() -> BlockSparseMatrix:
    layout = BlockSparseLayout.random((32, 48), 16, 0.5)
    return BlockSparseMatrix(torch.randn(layout.nnz_blocks, 16, 16), layout)


def test_dds_errors(mat: BlockSparseMatrix) -> None:
    with pytest.raises(ValueError, match="must agree on Q"):
        sparsevit.dds(torch.randn(4, 48), mat)  # mismatched K
    with pytest.raises(TypeError, match="same dtype"):
        sparsevit.dds(torch.randn(4, 32, dtype=torch.float16), mat)  # dtype mix
    with pytest.raises(TypeError, match="b must be a BlockSparseMatrix"):
        sparsevit.dds(torch.randn(4, 32), torch.randn(32, 48))
    with pytest.raises(ValueError, match="a must have at least 2 dims"):
        sparsevit.dds(torch.randn(32), mat)
    with pytest.raises(TypeError, match="a must be float32, float16 or bfloat16"):
        sparsevit.dds(torch.randn(4, 32).double(), mat)
    with pytest.raises(ValueError, match="same device"):
        sparsevit.dds(torch.randn(4, 32, device="meta"), mat)
    with pytest.raises(sparsevit.BackendUnavailableError, match="cuda: needs CUDA tensors"):
        sparsevit.dds(torch.randn(4, 32), mat, backend="cuda")


def test_dsd_errors(mat: BlockSparseMatrix) -> None:
    with pytest.raises(ValueError, match="must agree on Q"):
        sparsevit.dsd(mat, torch.randn(32, 5))
    with pytest.raises(TypeError, match="same dtype"):
        sparsevit.dsd(mat, torch.randn(48, 5, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="a must be a BlockSparseMatrix"):
        sparsevit.dsd(torch.randn(32, 48), torch.randn(48, 5))


def test_layout_on_another_device(mat: BlockSparseMatrix) -> None:
    meta_layout = mat.layout.to("meta")
    with pytest.raises(ValueError, match="layout must be on the same device as a"):
        sparsevit.sdd(torch.randn(32, 3), torch.randn(3, 48), meta_layout)
    with pytest.raises(ValueError, match="must be on the same device"):
        BlockSparseMatrix(mat.values, meta_layout)


def test_sdd_errors(mat: BlockSparseMatrix) -> None:
    layout = mat.layout
    with pytest.raises(ValueError, match="must agree on R"):
        sparsevit.sdd(torch.randn(32, 3), torch.randn(4, 48), layout)
    with pytest.raises(ValueError, match="but layout is"):
        sparsevit.sdd(torch.randn(16, 3), torch.randn(3, 48), layout)
    with pytest.raises(ValueError, match="same batch dims"):
        sparsevit.sdd(torch.randn(2, 32, 3), torch.randn(3, 3, 48), layout)
    with pytest.raises(TypeError, match="a and b must have the same dtype"):
        sparsevit.sdd(torch.randn(32, 3), torch.randn(3, 48).half(), layout)
    with pytest.raises(TypeError, match="layout must be a BlockSparseLayout"):
        sparsevit.sdd(torch.randn(32, 3), torch.randn(3, 48), layout.to_mask())
