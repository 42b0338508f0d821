"""The gradient through the row max: every backend against float64 autograd of the public formula.

DynamicViT's public ``softmax_with_policy`` subtracts ``torch.max(attn, dim=-1)[0]``
without detaching it, so its autograd sends ``∂/∂m_i`` to the first maximal key of
each row.  That term is ``ρ_i = eps / S_i`` times an O(1) quantity: negligible only
while a row's kept mass ``S_i − eps`` is large.  The regimes below (all keys dropped,
only the class token kept, random and soft policies at logit scales 1, 4 and 16) make
it as large as the gradient itself.  The public formula is written out here from the
paper, independently of :mod:`sparsevit.reference`.
"""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import backend_params, device_for, require_backend

EPS = 1e-6
POLICIES = ["zeros", "cls", "random", "soft"]
LOGIT_SCALES = [1.0, 4.0, 16.0]
SOFTMAX_BACKENDS = [p for p in backend_params() if p.values[0] != "triton"]


def public_softmax(attn: torch.Tensor, policy: torch.Tensor, eps: float) -> torch.Tensor:
    """DynamicViT Eq. 11 as published: max over all keys, differentiated (not detached)."""
    b, n = policy.shape
    eye = torch.eye(n, dtype=attn.dtype, device=attn.device).view(1, 1, n, n)
    gate = policy.to(attn.dtype).reshape(b, 1, 1, n)
    gate = gate + (1.0 - gate) * eye
    shifted = attn - torch.max(attn, dim=-1, keepdim=True)[0]
    w = shifted.exp() * gate
    return (w + eps / n) / (w.sum(dim=-1, keepdim=True) + eps)


def public_attention(q, k, v, policy, scale, eps):
    return public_softmax((q @ k.transpose(-2, -1)) * scale, policy, eps) @ v


def make_policy(kind: str, b: int, n: int, dev: torch.device) -> torch.Tensor:
    if kind == "zeros":
        return torch.zeros(b, n, device=dev)
    if kind == "cls":
        keep = torch.zeros(b, n, device=dev)
        keep[:, 0] = 1.0
        return keep
    if kind == "random":
        return (torch.rand(b, n, device=dev) > 0.5).float()
    return torch.rand(b, n, device=dev)


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))


def _rel(a: torch.Tensor, r: torch.Tensor) -> float:
    return ((a.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-300)).item()


def _assert_float_rounding(got, own, truth, names) -> None:
    """Each result is as close to the float64 truth as the public formula evaluated in
    float32 is (3x its error), up to float32 rounding of the largest value."""
    for name, a, o, r in zip(names, got, own, truth):
        err, bound = _rel(a, r), 3 * _rel(o, r) + 1e-6
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} (public float32: {_rel(o, r):.3g})"


@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("kind", POLICIES)
def test_closed_form_equals_public_autograd_float64(kind: str, scale: float) -> None:
    """The torch backend's closed-form gradients, evaluated in float64, are the public formula's
    autograd to float64 rounding: the derivation of the max term is exact."""
    b, h, n = 2, 3, 11
    scores = (scale * torch.randn(b, h, n, n, dtype=torch.float64)).requires_grad_()
    keep = make_policy(kind, b, n, torch.device("cpu")).double().requires_grad_()
    out = public_softmax(scores, keep, EPS)
    grad = torch.randn_like(out)
    ds, dk = torch.autograd.grad(out, [scores, keep], grad)
    probs, m, lse = reference.masked_softmax_stats(scores.detach(), keep.detach(), EPS)
    torch.testing.assert_close(probs, out.detach(), atol=1e-14, rtol=1e-12)
    ds2, dk2 = reference.masked_softmax_grads(grad, scores.detach(), keep.detach(), m, lse, EPS)
    torch.testing.assert_close(ds2, ds, atol=1e-13 * (1 + ds.abs().max().item()), rtol=1e-10)
    torch.testing.assert_close(dk2, dk, atol=1e-13 * (1 + dk.abs().max().item()), rtol=1e-10)


@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("kind", POLICIES)
def test_reference_is_the_public_formula(kind: str, scale: float) -> None:
    """reference.masked_attention differentiates through the max exactly like the public code."""
    b, h, n, d = 2, 2, 9, 8
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    q = q * scale
    keep = make_policy(kind, b, n, torch.device("cpu")).double()
    grad = torch.randn_like(q)
    ours = _grads(lambda a, c, e, kp: reference.masked_attention(a, c, e, kp, d ** -0.5, EPS), [q, k, v, keep], grad)
    theirs = _grads(lambda a, c, e, kp: public_attention(a, c, e, kp, d ** -0.5, EPS), [q, k, v, keep], grad)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, atol=1e-12 * (1 + r.abs().max().item()), rtol=1e-10)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("kind", POLICIES)
def test_attention_gradients_match_public_autograd(backend: str, kind: str, scale: float) -> None:
    """masked_attention (float32) on every backend: output and dq, dk, dv, dkeep equal the
    public formula's float64 autograd to float32 rounding."""
    require_backend(backend)
    dev = device_for(backend)
    b, h, n, d = 2, 2, 21, 16
    # float32 inputs; the truth is computed from exactly these values in float64
    q, k, v = (torch.randn(b, h, n, d, device=dev) for _ in range(3))
    q = q * scale
    keep = make_policy(kind, b, n, dev)
    grad = torch.randn_like(q)
    inputs = [q, k, v, keep]
    got = _grads(lambda a, c, e, kp: sparsevit.masked_attention(a, c, e, kp, eps=EPS, backend=backend), inputs, grad)
    truth = _grads(lambda a, c, e, kp: public_attention(a, c, e, kp, d ** -0.5, EPS),
                   [t.double() for t in inputs], grad.double())
    own = _grads(lambda a, c, e, kp: public_attention(a, c, e, kp, d ** -0.5, EPS), inputs, grad)
    _assert_float_rounding(got, own, truth, ["out", "dq", "dk", "dv", "dkeep"])


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("scale", LOGIT_SCALES)
@pytest.mark.parametrize("kind", POLICIES)
def test_softmax_gradients_match_public_autograd(backend: str, kind: str, scale: float) -> None:
    """masked_softmax (float32) on every backend: probabilities, dscores and dkeep."""
    require_backend(backend)
    dev = device_for(backend)
    b, h, n = 2, 3, 17
    scores = scale * torch.randn(b, h, n, n, device=dev)
    keep = make_policy(kind, b, n, dev)
    grad = torch.randn_like(scores)
    inputs = [scores, keep]
    got = _grads(lambda s, kp: sparsevit.masked_softmax(s, kp, EPS, backend=backend), inputs, grad)
    truth = _grads(lambda s, kp: public_softmax(s, kp, EPS), [t.double() for t in inputs], grad.double())
    own = _grads(lambda s, kp: public_softmax(s, kp, EPS), inputs, grad)
    _assert_float_rounding(got, own, truth, ["probs", "dscores", "dkeep"])


@pytest.mark.parametrize("backend", backend_params())
def test_tied_maximum_goes_to_the_first_key(backend: str) -> None:
    """Two keys share the row max: torch.max sends the max's gradient to the first; so do we."""
    require_backend(backend)
    dev = device_for(backend)
    n, d = 6, 16
    q = torch.zeros(1, 1, n, d, device=dev)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n, d, device=dev)
    k[0, 0, 2, 0] = k[0, 0, 4, 0] = 12.0  # keys 2 and 4 tie for every query's max
    v = torch.randn(1, 1, n, d, device=dev)
    keep = torch.zeros(1, n, device=dev)  # both dropped: the max term is the whole story
    grad = torch.randn_like(q)
    inputs = [q, k, v, keep]
    got = _grads(lambda a, c, e, kp: sparsevit.masked_attention(a, c, e, kp, eps=1e-3, backend=backend), inputs, grad)
    truth = _grads(lambda a, c, e, kp: public_attention(a, c, e, kp, d ** -0.5, 1e-3),
                   [t.double() for t in inputs], grad.double())
    assert truth[2][0, 0, 2].abs().max() > 1e-4 and truth[2][0, 0, 4, 1:].abs().max() < 1e-12
    for a, r in zip(got, truth):
        torch.testing.assert_close(a.double(), r, atol=1e-5 * (1 + r.abs().max().item()), rtol=1e-4)
