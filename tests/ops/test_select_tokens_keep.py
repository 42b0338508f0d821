"""select_tokens: count vs fraction said explicitly (keep_count= / keep_ratio=), and the edge values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsevit


@pytest.fixture
def xs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 11, 4, generator=gen), torch.randn(2, 10, generator=gen)


def test_keep_count_and_keep_ratio_agree_with_keep(xs) -> None:
    x, scores = xs
    for count in (0, 1, 3, 10):
        a = sparsevit.select_tokens(x, scores, count)[1]
        b = sparsevit.select_tokens(x, scores, keep_count=count)[1]
        assert torch.equal(a, b) and a.shape[1] == 1 + count
    for ratio in (0.0, 0.1, 0.25, 0.7, 1.0):
        a = sparsevit.select_tokens(x, scores, ratio)[1]
        b = sparsevit.select_tokens(x, scores, keep_ratio=ratio)[1]
        expected = {0.0: 0, 0.1: 1, 0.25: 3, 0.7: 7, 1.0: 10}[ratio]
        assert torch.equal(a, b) and a.shape[1] == 1 + expected


def test_the_ambiguous_one_is_explicit(xs) -> None:
    x, scores = xs
    assert sparsevit.select_tokens(x, scores, 1)[1].shape[1] == 2  # the int: one token
    assert sparsevit.select_tokens(x, scores, 1.0)[1].shape[1] == 11  # the float: all
    assert sparsevit.select_tokens(x, scores, keep_ratio=1)[1].shape[1] == 11  # keep_ratio reads 1 as 1.0
    assert sparsevit.select_tokens(x, scores, keep_count=1)[1].shape[1] == 2


def test_zero_is_the_prefix_only_either_way(xs) -> None:
    x, scores = xs
    for keep in (0, 0.0):
        tokens, index = sparsevit.select_tokens(x, scores, keep)
        assert index.shape == (2, 1) and torch.equal(tokens, x[:, :1])


def test_numpy_scalars(xs) -> None:
    x, scores = xs
    assert sparsevit.select_tokens(x, scores, np.int64(4))[1].shape[1] == 5
    assert sparsevit.select_tokens(x, scores, np.float32(0.5))[1].shape[1] == 6


def test_errors_name_the_argument(xs) -> None:
    x, scores = xs
    with pytest.raises(TypeError, match="exactly one of keep, keep_count, keep_ratio; got none"):
        sparsevit.select_tokens(x, scores)
    with pytest.raises(TypeError, match="got keep, keep_ratio"):
        sparsevit.select_tokens(x, scores, 3, keep_ratio=0.5)
    with pytest.raises(TypeError, match="keep_count must be an int, got float"):
        sparsevit.select_tokens(x, scores, keep_count=0.5)
    with pytest.raises(ValueError, match=r"keep_count must lie in \[0, 10\]"):
        sparsevit.select_tokens(x, scores, keep_count=11)
    with pytest.raises(ValueError, match=r"keep_ratio as a fraction must lie in \[0, 1\]"):
        sparsevit.select_tokens(x, scores, keep_ratio=1.5)
    with pytest.raises(ValueError, match="keep as a fraction"):
        sparsevit.select_tokens(x, scores, float("nan"))
    with pytest.raises(TypeError, match="keep_ratio must be a float"):
        sparsevit.select_tokens(x, scores, keep_ratio="0.5")
    with pytest.raises(TypeError, match="keep_count must be an int count"):
        sparsevit.select_tokens(x, scores, keep_count=True)
