"""masked_softmax against a float64 evaluation of the reference (forward, dscores, dkeep)."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import DTYPES, backend_params, device_for, require_backend, tolerances
from masked_helpers import dynamicvit_softmax, make_keep

BACKENDS = [p for p in backend_params() if p.values[0] != "triton"]

# (B, H, N, keep kind, eps)
CASES = [
    (1, 1, 1, "soft", 1e-6),
    (2, 2, 2, "bool", 1e-6),
    (1, 3, 5, "ones", 0.1),
    (2, 1, 13, "zeros", 1e-6),
    (2, 2, 13, "none", 1e-6),
    (1, 2, 40, "soft", 0.05),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward(backend: str, dtype: torch.dtype, case: tuple) -> None:
    require_backend(backend)
    b, h, n, kind, eps = case
    dev = device_for(backend)
    scores = (3 * torch.randn(b, h, n, n, device=dev)).to(dtype).requires_grad_()
    keep = make_keep(kind, b, n, dev)
    soft = keep is not None and keep.is_floating_point()
    if soft:
        keep.requires_grad_()
    out = sparsevit.masked_softmax(scores, keep, eps, backend=backend)
    assert out.dtype == dtype and out.shape == scores.shape
    s64 = scores.detach().double().requires_grad_()
    k64 = keep.detach().double().requires_grad_() if soft else keep
    ref = reference.masked_softmax(s64, k64, eps if keep is not None else 0.0)
    tol = tolerances(dtype)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn_like(ref)
    inputs = [scores] + ([keep] if soft else [])
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    exp = torch.autograd.grad(ref, [s64] + ([k64] if soft else []), grad)
    for a, r in zip(got, exp):
        scale = 1 + r.abs().max().item()
        torch.testing.assert_close(a.double() / scale, r / scale, **tol)


def test_closed_form_gradients_match_autograd() -> None:
    """The torch backend's closed-form gradients equal autograd through the formula."""
    scores = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(2, 7, dtype=torch.float64, requires_grad=True)
    eps = 0.05
    out = reference.masked_softmax(scores, keep, eps)
    grad = torch.randn_like(out)
    ds, dk = torch.autograd.grad(out, [scores, keep], grad)
    _, mw, lam = reference.masked_softmax_stats(scores.detach().float(), keep.detach().float(), eps)
    ds2, dk2 = reference.masked_softmax_grads(grad.float(), scores.detach().float(), keep.detach().float(), mw, lam, eps)
    torch.testing.assert_close(ds2.double(), ds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dk2.double(), dk, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_public_dynamicvit(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    scores = torch.randn(2, 2, 9, 9, device=dev)
    keep = torch.rand(2, 9, device=dev) > 0.5
    out = sparsevit.masked_softmax(scores, keep, backend=backend)
    torch.testing.assert_close(out, dynamicvit_softmax(scores, keep, 1e-6))
    rows = out.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_scores(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    scores = torch.randn(2, 9, 3, 9, device=dev).transpose(1, 2)
    keep = torch.rand(2, 9, device=dev)
    out = sparsevit.masked_softmax(scores, keep, 0.01, backend=backend)
    torch.testing.assert_close(out, reference.masked_softmax(scores.contiguous(), keep, 0.01))


def test_errors() -> None:
    s = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"scores must have 4 dims \(B, H, N, N\)"):
        sparsevit.masked_softmax(s[0])
    with pytest.raises(ValueError, match="square"):
        sparsevit.masked_softmax(torch.randn(2, 1, 4, 5))
    with pytest.raises(TypeError, match="scores must be float32, float16 or bfloat16"):
        sparsevit.masked_softmax(s.double())
    with pytest.raises(ValueError, match=r"keep must be \(B, N\) = \(2, 4\)"):
        sparsevit.masked_softmax(s, torch.ones(2, 5))
    with pytest.raises(TypeError, match="keep must be bool or floating point"):
        sparsevit.masked_softmax(s, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        sparsevit.masked_softmax(s, torch.ones(2, 4), eps=-1.0)
    with pytest.raises(ValueError, match="triton"):
        sparsevit.masked_softmax(s, backend="triton")
