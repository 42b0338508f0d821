"""float16/bfloat16 masked attention where kept keys sit far below a dropped maximum.

DynamicViT's weights ``exp(P − m) G`` are relative to the max over *all* keys; when the
policy drops the strongest keys, the kept ones are far below it.  A fused kernel that
feeds those weights to a half-precision P·V product loses them (below ~2⁻²⁴ they are 0).
Output and every gradient are compared with float64 autograd of the public formula on
the same (rounded) inputs: within 1e-2 relative on both backends, and the triton
backend no worse than about twice the torch backend (which materialises the
probabilities in float32), forward and backward.
"""

from __future__ import annotations

import pytest
import torch

import sparsevit
from helpers import device_for, require_backend

HALF = [torch.float16, torch.bfloat16]
NAMES = ["out", "dq", "dk", "dv", "dkeep"]


def public_attention(q, k, v, keep, scale, eps):
    """DynamicViT Eq. 11 as published (float64 here): max over all keys, differentiated."""
    attn = (q @ k.transpose(-2, -1)) * scale
    b, n = keep.shape
    eye = torch.eye(n, dtype=attn.dtype, device=attn.device).view(1, 1, n, n)
    gate = keep.to(attn.dtype).reshape(b, 1, 1, n)
    gate = gate + (1.0 - gate) * eye
    w = (attn - torch.max(attn, dim=-1, keepdim=True)[0]).exp() * gate
    return ((w + eps / n) / (w.sum(dim=-1, keepdim=True) + eps)) @ v


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))


def _rounding_floors(q, k, v, grad, scale) -> list:
    """float32 rounding (2⁻²⁰, a few units over a D-term sum) of each result's natural size,
    for results whose truth is (nearly) zero: out ~ |v|, dv ~ |dO|, dq ~ scale |dO| |v| |k|,
    dk ~ scale |dO| |v| |q|; dkeep is judged against its own size only."""
    big = [t.abs().max().item() for t in (q, k, v, grad)]
    mq, mk, mv, mg = big
    return [2 ** -20 * x for x in (mv, scale * mg * mv * mk, scale * mg * mv * mq, mg, 0.0)]


def _check(q, k, v, keep, grad, scale, eps) -> None:
    dtype = q.dtype
    inputs = [q, k, v, keep]
    truth = _grads(lambda a, b, c, kp: public_attention(a, b, c, kp, scale, eps),
                   [t.double() for t in inputs], grad.double())
    errs = {}
    for backend in ("torch", "triton"):
        got = _grads(lambda a, b, c, kp: sparsevit.masked_attention(a, b, c, kp, scale=scale, eps=eps, backend=backend),
                     inputs, grad)
        assert got[0].dtype == dtype
        errs[backend] = [(g.double() - r).abs().max().item() for g, r in zip(got, truth)]
    unit = torch.finfo(dtype).eps / 2
    floors = _rounding_floors(q, k, v, grad, scale)
    for i, name in enumerate(NAMES):
        size = truth[i].abs().max().item()
        floor = floors[i]
        for backend, e in errs.items():
            assert e[i] <= 1e-2 * size + floor, f"{backend} {name}: error {e[i]:.3g}, |truth| {size:.3g}"
        bound = 2 * errs["torch"][i] + 2 * unit * size + floor
        assert errs["triton"][i] <= bound, (
            f"triton {name}: error {errs['triton'][i]:.3g} > {bound:.3g} (torch: {errs['torch'][i]:.3g})"
        )


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("scale", [None, 1.0], ids=["default-scale", "scale-1"])
def test_kept_key_far_below_dropped_max(dtype: torch.dtype, scale) -> None:
    """The reported case: query 0 keeps only itself, the dropped key 1 scores 20 (80) above."""
    for backend in ("torch", "triton"):
        require_backend(backend)
    dev = device_for("triton")
    q = torch.zeros(1, 1, 2, 16, device=dev)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 2, 16, device=dev)
    k[0, 0, 1, 0] = 80
    v = torch.randn(1, 1, 2, 16, device=dev)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    keep = torch.tensor([[1.0, 0.0]], device=dev)
    s = 16 ** -0.5 if scale is None else scale
    for backend in ("torch", "triton"):
        out = sparsevit.masked_attention(q, k, v, keep, scale=scale, eps=0.0, backend=backend)
        torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0], atol=0, rtol=0)
    _check(q, k, v, keep, torch.randn_like(q), s, 0.0)
    _check(q, k, v, keep, torch.randn_like(q), s, 1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("std", [8.0, 16.0])
@pytest.mark.parametrize("n, d", [(40, 16), (64, 32)])
def test_hard_policy_large_scores(dtype: torch.dtype, std: float, n: int, d: int) -> None:
    """Random hard policies with score std 8 and 16: many rows lose their strongest keys."""
    for backend in ("torch", "triton"):
        require_backend(backend)
    dev = device_for("triton")
    b, h = 2, 2
    q = (torch.randn(b, h, n, d, device=dev) * std).to(dtype)
    k, v, grad = (torch.randn(b, h, n, d, device=dev).to(dtype) for _ in range(3))
    keep = (torch.rand(b, n, device=dev) > 0.5).float()
    _check(q, k, v, keep, grad, d ** -0.5, 1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("policy", ["zeros", "cls"])
def test_rows_that_attend_to_one_key(dtype: torch.dtype, policy: str) -> None:
    """All keys (or all but the class token) dropped: each row's output is one value row,
    dq/dk are eps-sized, and Δ = dO·O must come from the unrounded output."""
    for backend in ("torch", "triton"):
        require_backend(backend)
    dev = device_for("triton")
    b, h, n, d = 2, 2, 48, 16
    q, k, v, grad = (torch.randn(b, h, n, d, device=dev).to(dtype) for _ in range(4))
    keep = torch.zeros(b, n, device=dev)
    if policy == "cls":
        keep[:, 0] = 1.0
    _check(q, k, v, keep, grad, d ** -0.5, 1e-6)
