"""masked_attention against a float64 evaluation of the reference, every backend, fwd + all grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsevit
from sparsevit import reference
from helpers import DTYPES, backend_params, device_for, require_backend
from masked_helpers import dynamicvit_attention, make_keep, max_err

# (B, H, N, D, keep kind, eps): odd N (1, 2, 5, 13, 17), D not a power of two, batch 1,
# keep all ones / all zeros / bool / soft / none, eps large enough to matter, ViT lengths.
CASES = [
    (1, 1, 1, 32, "soft", 1e-6),
    (2, 2, 2, 20, "bool", 1e-6),
    (1, 2, 5, 16, "ones", 1e-6),
    (2, 1, 13, 20, "zeros", 1e-6),
    (2, 2, 13, 32, "none", 1e-6),
    (1, 1, 17, 80, "soft", 0.05),
    (2, 1, 13, 24, "soft", 0.0),
    (1, 1, 197, 64, "soft", 1e-6),  # DeiT's N
    (1, 1, 200, 20, "bool", 0.01),
]


def _run(fn, q, k, v, keep, grad):
    """Output and gradients (dq, dk, dv, dkeep or None) of ``fn``."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kp = keep
    if keep is not None and keep.is_floating_point():
        kp = keep.detach().clone().requires_grad_()
    out = fn(*leaves, kp)
    inputs = leaves + ([kp] if kp is not None and kp.requires_grad else [])
    grads = list(torch.autograd.grad(out, inputs, grad))
    if len(grads) == 3:
        grads.append(None)
    return [out.detach()] + grads


def _check(backend: str, dtype: torch.dtype, q, k, v, keep, eps: float, scale: float) -> None:
    grad = torch.randn_like(q)
    got = _run(lambda a, b, c, kp: sparsevit.masked_attention(a, b, c, kp, scale=scale, eps=eps, backend=backend),
               q, k, v, keep, grad)
    ref_eps = eps if keep is not None else 0.0
    exact = _run(lambda a, b, c, kp: reference.masked_attention(a, b, c, None if kp is None else kp.double()
                                                                if kp.is_floating_point() else kp, scale, ref_eps),
                 q.double(), k.double(), v.double(), keep, grad.double())
    names = ["out", "dq", "dk", "dv", "dkeep"]
    assert got[0].dtype == dtype and got[0].shape == q.shape
    if dtype == torch.float32:
        for name, a, r in zip(names, got, exact):
            if r is None:
                assert a is None, name
                continue
            torch.testing.assert_close(a.double(), r.double(), atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    # Low precision: at most 2x the error of PyTorch's own same-dtype computation, plus
    # a few units of rounding of the largest value: a fused backward forms
    # Δ_i = dO_i · O_i from the rounded output O (as FlashAttention does).
    own = _run(lambda a, b, c, kp: dynamicvit_attention(a, b, c, kp, scale, ref_eps), q, k, v, keep, grad)
    unit = torch.finfo(dtype).eps / 2
    largest = max(r.abs().max().item() for r in exact if r is not None and r.numel())
    for name, a, o, r in zip(names, got, own, exact):
        if r is None:
            continue
        err, bound = max_err(a, r), 2 * max_err(o, r) + 4 * unit * (1 + largest)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (PyTorch {dtype}: {max_err(o, r):.3g})"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward(backend: str, dtype: torch.dtype, case: tuple) -> None:
    require_backend(backend)
    b, h, n, d, kind, eps = case
    dev = device_for(backend)
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    keep = make_keep(kind, b, n, dev)
    _check(backend, dtype, q, k, v, keep, eps, d ** -0.5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_fused_qkv(backend: str, dtype: torch.dtype) -> None:
    """q, k, v as views of a fused (B, N, 3, H, D) projection, as in timm's Attention."""
    require_backend(backend)
    b, n, h, d = 2, 11, 3, 20
    dev = device_for(backend)
    qkv = torch.randn(b, n, 3, h, d, device=dev, dtype=dtype).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    _check(backend, dtype, q, k, v, make_keep("soft", b, n, dev), 0.01, 0.3)


@pytest.mark.parametrize("backend", backend_params())
def test_keep_none_is_softmax_attention(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    q, k, v = (torch.randn(2, 3, 9, 16, device=dev) for _ in range(3))
    out = sparsevit.masked_attention(q, k, v, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_keep_zero_attends_to_self(backend: str) -> None:
    """All keys dropped and eps = 0: each query sees only itself, so out = v."""
    require_backend(backend)
    dev = device_for(backend)
    q, k, v = (torch.randn(1, 2, 7, 16, device=dev) for _ in range(3))
    out = sparsevit.masked_attention(q, k, v, torch.zeros(1, 7, device=dev), eps=0.0, backend=backend)
    torch.testing.assert_close(out, v, atol=1e-6, rtol=1e-5)
    # a hard mask equals attention restricted to the kept keys (plus the diagonal)
    keep = torch.tensor([[True, False, True, True, False, False, True]], device=dev)
    out = sparsevit.masked_attention(q, k, v, keep, eps=0.0, backend=backend)
    for i in range(7):
        cols = keep[0].clone()
        cols[i] = True
        row = F.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, cols], v[:, :, cols])
        torch.testing.assert_close(out[:, :, i : i + 1], row, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_matches_public_dynamicvit(backend: str) -> None:
    """Forward and gradients equal the published formula (its autograd goes through the max)."""
    require_backend(backend)
    dev = device_for(backend)
    b, h, n, d = 2, 2, 6, 16
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.float64).float() for _ in range(3))
    keep = torch.rand(b, n, device=dev)
    grad = torch.randn_like(q)
    ours = _run(lambda a, c, e, kp: sparsevit.masked_attention(a, c, e, kp, backend=backend), q, k, v, keep, grad)
    theirs = _run(lambda a, c, e, kp: dynamicvit_attention(a, c, e, kp, d ** -0.5, 1e-6), q, k, v, keep, grad)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def test_bool_keep_gets_no_grad_and_soft_keep_does() -> None:
    q, k, v = (torch.randn(1, 1, 5, 8, requires_grad=True) for _ in range(3))
    hard = torch.tensor([[True, False, True, True, False]])
    sparsevit.masked_attention(q, k, v, hard).sum().backward()
    assert hard.grad is None and q.grad is not None
    soft = torch.full((1, 5), 0.5, requires_grad=True)
    (sparsevit.masked_attention(q, k, v, soft) * torch.randn(1, 1, 5, 8)).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0 and soft.grad.dtype == soft.dtype


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [197, 200])
@pytest.mark.parametrize("d", [32, 64, 80, 96, 128])
def test_vit_sizes_on_gpu(backend: str, dtype: torch.dtype, n: int, d: int) -> None:
    """ViT lengths (DeiT N = 197) and every supported head dim, soft mask, on the GPU."""
    require_backend(backend)
    dev = device_for(backend)
    q, k, v = (torch.randn(2, 3, n, d, device=dev, dtype=dtype) for _ in range(3))
    _check(backend, dtype, q, k, v, make_keep("soft", 2, n, dev), 1e-6, d ** -0.5)
