"""select_tokens: prefix kept, top-k by score, both orders, fractions, every backend."""

from __future__ import annotations

import math

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import DTYPES, backend_params, device_for, require_backend, tolerances


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_prefix", [0, 1, 3])
@pytest.mark.parametrize("order", ["position", "score"])
def test_select_matches_reference(backend: str, dtype: torch.dtype, num_prefix: int, order: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    b, n, c, keep = 3, 13, 10, 5
    x = torch.randn(b, n, c, device=dev, dtype=dtype, requires_grad=True)
    scores = torch.randn(b, n - num_prefix, device=dev)
    tokens, index = sparsevit.select_tokens(x, scores, keep, num_prefix=num_prefix, order=order, backend=backend)
    ref_tokens, ref_index = reference.select_tokens(x, scores, keep, num_prefix, order)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(tokens, ref_tokens, atol=0, rtol=0)
    assert index.shape == (b, num_prefix + keep)
    assert torch.equal(index[:, :num_prefix], torch.arange(num_prefix, device=dev).expand(b, -1))
    kept = index[:, num_prefix:] - num_prefix
    kept_scores = scores.gather(1, kept)
    best = scores.topk(keep, dim=1).values
    torch.testing.assert_close(kept_scores.sort(dim=1).values, best.sort(dim=1).values)
    if order == "position":
        assert (kept[:, 1:] > kept[:, :-1]).all()
    else:
        assert (kept_scores[:, 1:] <= kept_scores[:, :-1]).all()
    grad = torch.randn_like(tokens)
    (gx,) = torch.autograd.grad(tokens, x, grad)
    (gx_ref,) = torch.autograd.grad(ref_tokens, x, grad)
    torch.testing.assert_close(gx, gx_ref, **tolerances(dtype))


@pytest.mark.parametrize("backend", backend_params())
def test_select_full_scores_fraction_and_edges(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    x = torch.randn(2, 11, 4, device=dev)
    full_scores = torch.randn(2, 11, device=dev)
    full_scores[:, 0] = -1e9  # a prefix score must be ignored, not ranked
    tokens, index = sparsevit.select_tokens(x, full_scores, 0.7, backend=backend)
    assert index.shape[1] == 1 + math.ceil(0.7 * 10)
    assert (index[:, 0] == 0).all() and (index[:, 1:] > 0).all()
    _, index_sub = sparsevit.select_tokens(x, full_scores[:, 1:], 0.7, backend=backend)
    assert torch.equal(index, index_sub)
    tokens, index = sparsevit.select_tokens(x, full_scores, 0, backend=backend)  # prefix only
    torch.testing.assert_close(tokens, x[:, :1])
    tokens, index = sparsevit.select_tokens(x, full_scores, 10, backend=backend)  # keep all
    torch.testing.assert_close(tokens, x)  # position order: the identity


def test_select_errors() -> None:
    x = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="keep must lie in"):
        sparsevit.select_tokens(x, torch.randn(2, 5), 6)
    with pytest.raises(ValueError, match="keep as a fraction"):
        sparsevit.select_tokens(x, torch.randn(2, 5), 1.5)
    with pytest.raises(TypeError, match="keep must be"):
        sparsevit.select_tokens(x, torch.randn(2, 5), True)
    with pytest.raises(ValueError, match="scores must be"):
        sparsevit.select_tokens(x, torch.randn(2, 4), 2)
    with pytest.raises(ValueError, match="scores must be"):
        sparsevit.select_tokens(x, torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="num_prefix must be <="):
        sparsevit.select_tokens(x, torch.randn(2, 5), 2, num_prefix=7)
    with pytest.raises(ValueError, match="order must be"):
        sparsevit.select_tokens(x, torch.randn(2, 5), 2, order="random")
    with pytest.raises(ValueError, match="same device"):
        sparsevit.select_tokens(x, torch.randn(2, 5, device="meta"), 2)


def _float_ceil_failures(max_m: int) -> list[tuple[float, int]]:
    """Two-decimal fractions and counts M < max_m where ``math.ceil(keep * M)`` overshoots."""
    from fractions import Fraction

    return [
        (p / 100, m)
        for p in range(1, 100)
        for m in range(1, max_m)
        if math.ceil(p / 100 * m) != math.ceil(Fraction(str(p / 100)) * m)
    ]


def test_select_fraction_rounds_exactly() -> None:
    """keep=0.28 of M=25 keeps 7 tokens (the float product 7.000000000000001 gave 8)."""
    from fractions import Fraction

    failures = _float_ceil_failures(400)
    assert (0.28, 25) in failures
    for keep, m in failures:
        x = torch.randn(1, m + 1, 1)
        _, index = sparsevit.select_tokens(x, torch.randn(1, m), keep, backend="torch")
        assert index.shape[1] == 1 + math.ceil(Fraction(str(keep)) * m), (keep, m)


@pytest.mark.parametrize("backend", backend_params())
def test_select_fraction_exact_on_every_backend(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    x = torch.randn(2, 26, 3, device=dev)
    tokens, index = sparsevit.select_tokens(x, torch.randn(2, 25, device=dev), 0.28, backend=backend)
    assert index.shape == (2, 8) and tokens.shape == (2, 8, 3)  # prefix + 7
