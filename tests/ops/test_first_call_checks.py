"""Value and layout problems are reported at the first call that can see them, naming the argument."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import BlockSparseMatrix


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_from_dense_refuses_dtypes_the_products_cannot_take(dtype: torch.dtype) -> None:
    dense = torch.ones(32, 32, dtype=dtype)
    with pytest.raises(TypeError, match=f"dense must be a floating-point tensor .*got {dtype}"):
        BlockSparseMatrix.from_dense(dense, block_size=16, sparsity=0.5)


def test_from_dense_bad_types_and_shapes() -> None:
    with pytest.raises(TypeError, match="dense must be a torch.Tensor"):
        BlockSparseMatrix.from_dense([[1.0]], block_size=16, sparsity=0.5)
    with pytest.raises(ValueError, match=r"dense must be a 2-D tensor \(M, K\), got shape \(2, 16, 16\)"):
        BlockSparseMatrix.from_dense(torch.randn(2, 16, 16), block_size=16, sparsity=0.5)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m = BlockSparseMatrix.from_dense(torch.randn(32, 32, dtype=dtype), block_size=16, sparsity=0.5)
        assert m.values.dtype == dtype


def test_a_bnhd_layout_is_named_as_the_problem() -> None:
    b, n, h, d = 2, 7, 3, 8
    q = torch.randn(b, n, h, d)  # (B, N, H, D): the wrong layout
    keep = torch.ones(b, n)
    with pytest.raises(ValueError, match=r"is q \(B, N, H, D\)\? The layout is \(B, H, N, D\)"):
        sparsevit.masked_attention(q, q, q, keep)
    # a keep that is simply wrong gets no layout hint
    with pytest.raises(ValueError) as info:
        sparsevit.masked_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), torch.ones(b, n + 1))
    assert "layout" not in str(info.value)
    out = sparsevit.masked_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), keep)
    assert out.shape == (b, h, n, d)
