"""Edges of masked attention / masked softmax: bad keep values, empty dims, 32-bit offsets.

* A negative, NaN or infinite ``keep_j`` (not inspected, which would cost a device
  sync) makes every output row of its batch element NaN, on every backend and in the
  reference (the public formula ``G = g + (1 − g) I`` already does so for a non-finite
  one); other batch elements are untouched.
* B, H or N of 0 give empty outputs and empty (or zero) gradients everywhere.
* A (b, h) slice spanning more than 2³¹ elements is addressed with int64 offsets.
"""

from __future__ import annotations

import math
import tempfile

import pytest
import torch

import sparsevit
from sparsevit import reference
from sparsevit.ops.masked_attention import MASKED_ATTENTION_SUPPORT, TRITON_MAX_SLICES
from helpers import backend_params, device_for, require_backend

SOFTMAX_BACKENDS = [p for p in backend_params() if p.values[0] != "triton"]
BAD = [math.nan, math.inf, -math.inf, -0.5]


def _grads(out, leaves):
    return torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bad", BAD, ids=str)
@pytest.mark.parametrize("where", [0, 4], ids=["class-token", "patch"])
def test_bad_keep_value_poisons_its_batch_element(backend: str, bad: float, where: int) -> None:
    require_backend(backend)
    dev = device_for(backend)
    q, k, v = (torch.randn(2, 2, 7, 16, device=dev, requires_grad=True) for _ in range(3))
    keep = torch.rand(2, 7, device=dev)
    keep[1, where] = bad
    keep.requires_grad_()
    out = sparsevit.masked_attention(q, k, v, keep, eps=1e-6, backend=backend)
    ref = reference.masked_attention(q, k, v, keep, None, 1e-6)
    assert torch.isnan(ref[1]).all() and torch.isnan(out[1]).all()
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-4)
    dq, dk, dv, dkeep = _grads(out, [q, k, v, keep])
    for g in (dq, dk, dv):
        assert torch.isfinite(g[0]).all()
    assert torch.isfinite(dkeep[0]).all() and torch.isnan(dkeep[1]).all()


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("bad", BAD, ids=str)
def test_bad_keep_value_in_masked_softmax(backend: str, bad: float) -> None:
    require_backend(backend)
    dev = device_for(backend)
    scores = torch.randn(2, 2, 6, 6, device=dev, requires_grad=True)
    keep = torch.rand(2, 6, device=dev)
    keep[1, 3] = bad
    out = sparsevit.masked_softmax(scores, keep, 1e-6, backend=backend)
    ref = reference.masked_softmax(scores, keep, 1e-6)
    assert torch.isnan(ref[1]).all() and torch.isnan(out[1]).all()
    torch.testing.assert_close(out[0], ref[0], atol=1e-6, rtol=1e-5)
    (ds,) = _grads(out, [scores])
    assert torch.isfinite(ds[0]).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(2, 3, 0, 16), (0, 2, 5, 16), (2, 0, 5, 16), (2, 2, 5, 0)], ids=str)
def test_empty_dims_attention(backend: str, shape: tuple) -> None:
    require_backend(backend)
    dev = device_for(backend)
    b, _, n, _ = shape
    q, k, v = (torch.randn(shape, device=dev, requires_grad=True) for _ in range(3))
    for keep in (torch.rand(b, n, device=dev, requires_grad=True), None):
        out = sparsevit.masked_attention(q, k, v, keep, backend=backend)
        assert out.shape == shape
        leaves = [q, k, v] + ([keep] if keep is not None else [])
        grads = torch.autograd.grad(out.sum(), leaves)
        for leaf, g in zip(leaves, grads):
            assert g.shape == leaf.shape and (g == 0).all()


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 0), (0, 2, 5, 5), (2, 0, 5, 5)], ids=str)
def test_empty_dims_softmax(backend: str, shape: tuple) -> None:
    require_backend(backend)
    dev = device_for(backend)
    b, _, n, _ = shape
    scores = torch.randn(shape, device=dev, requires_grad=True)
    keep = torch.rand(b, n, device=dev, requires_grad=True)
    out = sparsevit.masked_softmax(scores, keep, backend=backend)
    assert out.shape == shape
    ds, dk = torch.autograd.grad(out.sum(), [scores, keep])
    assert ds.shape == shape and dk.shape == (b, n) and (dk == 0).all()
    assert reference.masked_softmax(scores, keep).shape == shape


@pytest.mark.parametrize("backend", backend_params())
def test_slice_past_int32_offsets(backend: str) -> None:
    """One (b, h) slice whose rows are 2²⁷ elements apart: row 16 starts at element 2³¹.

    The views live in a sparse memory-mapped file, so only the rows touched take memory.
    """
    require_backend(backend)
    if device_for(backend).type != "cpu":
        pytest.skip("the sparse file mapping is a CPU-memory construction")
    n, d, row = 17, 16, 2 ** 27
    numel = (n - 1) * row + 3 * d
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(numel * 2)
        storage = torch.from_file(f.name, shared=True, size=numel, dtype=torch.float16)
        q, k, v = (storage.as_strided((1, 1, n, d), (0, 0, row, 1), i * d) for i in range(3))
        for t in (q, k, v):
            t.copy_(torch.randn(1, 1, n, d).half())
        keep = torch.rand(1, n)
        compact = [t.clone().requires_grad_() for t in (q, k, v)]
        strided = [t.detach().requires_grad_() for t in (q, k, v)]
        grad = torch.randn(1, 1, n, d).half()
        out = sparsevit.masked_attention(*strided, keep, backend=backend)
        exp = sparsevit.masked_attention(*compact, keep, backend=backend)
        torch.testing.assert_close(out, exp, atol=0, rtol=0)
        for a, e in zip(torch.autograd.grad(out, strided, grad), torch.autograd.grad(exp, compact, grad)):
            torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_triton_grid_limit_is_checked() -> None:
    """B·H programs go on grid axis 1 (at most 65535): more is refused with a reason."""
    q = torch.empty(1, TRITON_MAX_SLICES + 1, 4, 16, device="meta")
    reason = MASKED_ATTENTION_SUPPORT.backends["triton"].check([q, q, q])
    assert reason is not None and "65535" in reason
    assert MASKED_ATTENTION_SUPPORT.backends["triton"].check([q[:, :TRITON_MAX_SLICES]] * 3) is None
