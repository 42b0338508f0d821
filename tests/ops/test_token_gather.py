"""gather_tokens / scatter_tokens / scatter_add_tokens against the reference, every backend."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import DTYPES, backend_params, device_for, require_backend, tolerances

# (B, N, C, K): batch 1, odd sizes, K = 0, K = N, K > N (repeats), C = 1.
SHAPES = [(1, 1, 1, 1), (2, 7, 13, 5), (3, 17, 33, 17), (2, 5, 3, 0), (1, 9, 70, 12), (2, 4, 1, 3)]


def _index(b: int, n: int, k: int, device: torch.device, distinct: bool = False) -> torch.Tensor:
    if distinct:
        return torch.stack([torch.randperm(n, device=device)[:k] for _ in range(b)])
    return torch.randint(0, n, (b, k), device=device)


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` (B, N, C) in a (B, C, N)-major layout: a transposed view."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_forward_backward(backend: str, dtype: torch.dtype, shape: tuple) -> None:
    require_backend(backend)
    b, n, c, k = shape
    dev = device_for(backend)
    x = torch.randn(b, n, c, device=dev, dtype=dtype, requires_grad=True)
    index = _index(b, n, k, dev)
    out = sparsevit.gather_tokens(x, index, backend=backend)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference.gather_tokens(x_ref, index)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # a copy: bit-exact
    assert out.is_contiguous() and out.dtype == dtype
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerances(dtype))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_noncontiguous_and_int32(backend: str, dtype: torch.dtype) -> None:
    require_backend(backend)
    dev = device_for(backend)
    full = torch.randn(2, 11, 2 * 19, device=dev, dtype=dtype)
    for x in (_noncontiguous(full), full[:, :, ::2], full[:, 1:, 5:24]):
        assert not x.is_contiguous()
        index = _index(2, x.shape[1], 6, dev).to(torch.int32)
        index_view = torch.cat([index, index], dim=1)[:, ::2]  # a strided index
        out = sparsevit.gather_tokens(x, index_view, backend=backend)
        torch.testing.assert_close(out, reference.gather_tokens(x, index_view.long()), atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scatter_forward_backward(backend: str, dtype: torch.dtype, shape: tuple) -> None:
    require_backend(backend)
    b, n, c, k = shape
    k = min(k, n)  # scatter needs distinct indices
    dev = device_for(backend)
    src = torch.randn(b, k, c, device=dev, dtype=dtype, requires_grad=True)
    base = _noncontiguous(torch.randn(b, n, c, device=dev, dtype=dtype)).requires_grad_()
    index = _index(b, n, k, dev, distinct=True)
    out = sparsevit.scatter_tokens(src, index, base=base, backend=backend)
    src_ref = src.detach().clone().requires_grad_()
    base_ref = base.detach().clone().requires_grad_()
    ref = reference.scatter_tokens(src_ref, index, base_ref)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(src.grad, src_ref.grad, atol=0, rtol=0)
    torch.testing.assert_close(base.grad, base_ref.grad, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_fill(backend: str, dtype: torch.dtype) -> None:
    require_backend(backend)
    dev = device_for(backend)
    src = torch.randn(3, 4, 10, device=dev, dtype=dtype)
    index = _index(3, 9, 4, dev, distinct=True)
    out = sparsevit.scatter_tokens(src, index, 9, fill=-2.5, backend=backend)
    expected = reference.scatter_tokens(src, index, torch.full((3, 9, 10), -2.5, device=dev, dtype=dtype))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # scatter then gather is the identity on the kept rows
    torch.testing.assert_close(sparsevit.gather_tokens(out, index, backend=backend), src, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_add_repeats(backend: str, dtype: torch.dtype) -> None:
    require_backend(backend)
    dev = device_for(backend)
    src = _noncontiguous(torch.randn(2, 15, 21, device=dev, dtype=dtype)).requires_grad_()
    index = _index(2, 4, 15, dev)  # many repeats
    out = sparsevit.scatter_add_tokens(src, index, 6, backend=backend)
    src_ref = src.detach().clone().requires_grad_()
    ref = reference.scatter_add_tokens(src_ref, index, 6)
    torch.testing.assert_close(out, ref, **tolerances(dtype))
    assert out[:, 4:].abs().max() == 0  # rows no index points at stay zero
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(src.grad, src_ref.grad, atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_unchecked_bad_index_stays_in_bounds(backend: str) -> None:
    """check_index=False: out-of-range rows gather as zeros and scatter nowhere."""
    require_backend(backend)
    dev = device_for(backend)
    x = torch.randn(2, 5, 8, device=dev)
    index = torch.tensor([[0, 5, -1, 4], [100, 2, 3, -7]], device=dev)
    out = sparsevit.gather_tokens(x, index, check_index=False, backend=backend)
    torch.testing.assert_close(out, reference.gather_tokens(x, index))
    assert out[0, 1].abs().sum() == 0 and out[1, 0].abs().sum() == 0
    base = torch.randn(2, 5, 8, device=dev)
    src = torch.randn(2, 4, 8, device=dev)
    out = sparsevit.scatter_tokens(src, index, base=base, check_index=False, backend=backend)
    torch.testing.assert_close(out, reference.scatter_tokens(src, index, base))
    summed = sparsevit.scatter_add_tokens(src, index, 5, check_index=False, backend=backend)
    torch.testing.assert_close(summed, reference.scatter_add_tokens(src, index, 5))
