"""Well-defined token ops: scatter with repeated indices (last one wins) and deterministic sums."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import DTYPES, backend_params, device_for, require_backend, tolerances


def _loop_scatter(src: torch.Tensor, index: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The rule, written as the plain in-order loop: later rows overwrite earlier ones."""
    out = base.clone()
    for b in range(index.shape[0]):
        for k in range(index.shape[1]):
            i = int(index[b, k])
            if 0 <= i < base.shape[1]:
                out[b, i] = src[b, k]
    return out


def _loop_grads(grad: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dsrc, dbase) of the loop: a source row gets ``grad`` at its token only if it wins."""
    b, k = index.shape
    dsrc = grad.new_zeros(b, k, grad.shape[2])
    dbase = grad.clone()
    for bb in range(b):
        last = {int(i): kk for kk, i in enumerate(index[bb].tolist()) if 0 <= i < grad.shape[1]}
        for i, kk in last.items():
            dsrc[bb, kk] = grad[bb, i]
            dbase[bb, i] = 0
    return dsrc, dbase


def _repeated_index(b: int, n: int, k: int, dev: torch.device) -> torch.Tensor:
    """Many repeats and some out-of-range entries."""
    index = torch.randint(-1, n + 1, (b, k), device=dev)
    index[:, -1] = index[:, 0]  # at least one repeat per row
    return index


def test_reference_scatter_last_index_wins() -> None:
    src = torch.randn(2, 6, 4, requires_grad=True)
    base = torch.randn(2, 5, 4)
    index = torch.tensor([[1, 3, 1, 1, 0, 3], [2, 2, 2, 9, -1, 4]])
    out = reference.scatter_tokens(src, index, base)
    torch.testing.assert_close(out, _loop_scatter(src.detach(), index, base), atol=0, rtol=0)
    assert torch.equal(out[0, 1], src[0, 3].detach()) and torch.equal(out[0, 3], src[0, 5].detach())
    out.sum().backward()
    # Only the winning rows reach the output, so only they get gradient.
    wins = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 0, 0, 1]], dtype=torch.bool)
    torch.testing.assert_close(src.grad, wins[..., None].float().expand(2, 6, 4), atol=0, rtol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 3, 12), (2, 7, 33, 20), (3, 4, 1, 9)], ids=str)
def test_scatter_repeats_last_wins_on_every_backend(backend: str, dtype: torch.dtype, shape: tuple) -> None:
    """Forward and both gradients equal the in-order loop bit for bit, on every backend."""
    require_backend(backend)
    dev = device_for(backend)
    b, n, c, k = shape
    index = _repeated_index(b, n, k, dev)
    src = torch.randn(b, k, c, device=dev, dtype=dtype)
    base = torch.randn(b, n, c, device=dev, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    s_op, b_op = src.clone().requires_grad_(), base.clone().requires_grad_()
    s_ref, b_ref = src.clone().requires_grad_(), base.clone().requires_grad_()
    out = sparsevit.scatter_tokens(s_op, index, base=b_op, check_index=False, backend=backend)
    ref = reference.scatter_tokens(s_ref, index, b_ref)
    torch.testing.assert_close(out, _loop_scatter(src, index, base), atol=0, rtol=0)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    dsrc, dbase = _loop_grads(grad, index)
    torch.testing.assert_close(s_op.grad, dsrc, atol=0, rtol=0)  # overwritten rows: no gradient
    torch.testing.assert_close(b_op.grad, dbase, atol=0, rtol=0)
    torch.testing.assert_close(s_op.grad, s_ref.grad, atol=0, rtol=0)
    torch.testing.assert_close(b_op.grad, b_ref.grad, atol=0, rtol=0)
    again = sparsevit.scatter_tokens(src, index, base=base, check_index=False, backend=backend)
    assert torch.equal(again, out.detach())


class _deterministic:
    """``torch.use_deterministic_algorithms(True)`` for a block, restored after."""

    def __enter__(self) -> None:
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc) -> None:
        torch.use_deterministic_algorithms(self.before)


def _sum_and_gather_grad(src: torch.Tensor, x: torch.Tensor, index: torch.Tensor, n: int, backend: str):
    """scatter_add_tokens forward and the gradient of gather_tokens (a scatter-add too)."""
    summed = sparsevit.scatter_add_tokens(src, index, n, backend=backend)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(sparsevit.gather_tokens(leaf, index, backend=backend), leaf, src)
    return summed, grad


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_sums_are_reproducible(backend: str, dtype: torch.dtype) -> None:
    """With deterministic algorithms on, the sums repeat bit for bit and equal the reference.

    One destination row receives most of the sources, with magnitudes where the order
    of the fp32 additions changes the result (float atomics would vary between runs).
    """
    require_backend(backend)
    dev = device_for(backend)
    b, n, k, c = 2, 5, 400, 33
    index = torch.randint(0, n, (b, k), device=dev)
    index[:, ::2] = 1
    src = (torch.randn(b, k, c, device=dev) * torch.logspace(-4, 4, k, device=dev)[None, :, None]).to(dtype)
    x = torch.randn(b, n, c, device=dev, dtype=dtype)
    with _deterministic():
        first = _sum_and_gather_grad(src, x, index, n, backend)
        for _ in range(3):
            again = _sum_and_gather_grad(src, x, index, n, backend)
            for got, want in zip(again, first):
                assert torch.equal(got, want), "deterministic mode must give the same bits every run"
        ref = reference.scatter_add_tokens(src, index, n)
    for got in first:
        torch.testing.assert_close(got.float(), ref.float(), **tolerances(dtype))
        if dev.type == "cpu":  # the same fp32 additions in the same (ascending k) order
            assert torch.equal(got, ref)


def test_deterministic_triton_avoids_atomics(monkeypatch: pytest.MonkeyPatch) -> None:
    """In deterministic mode the Triton backend runs the segment sum, never the atomic kernel."""
    from sparsevit.kernels import token_gather as kernels

    def atomic(*args, **kwargs):
        raise AssertionError("float atomics used with deterministic algorithms enabled")

    monkeypatch.setattr(kernels, "scatter_add_tokens", atomic)
    dev = device_for("triton")
    index = torch.tensor([[1, 1, 1, 1, 0, 1]], device=dev)
    src = torch.tensor([[1e8, 1.0, -1e8, 1.0, 2.0, 0.5]], device=dev)[..., None]
    with _deterministic():
        summed, grad = _sum_and_gather_grad(src, torch.zeros(1, 3, 1, device=dev), index, 3, "triton")
    # ((1e8 + 1) − 1e8) + 1 + 0.5 in fp32, in ascending k: the 1 is absorbed, then 1.5 is added.
    want = torch.tensor([[[2.0], [1.5], [0.0]]], device=dev)
    assert torch.equal(summed, want) and torch.equal(grad, want)
    with pytest.raises(AssertionError, match="float atomics"):  # outside the mode, atomics as before
        sparsevit.scatter_add_tokens(src, index, 3, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_under_contention(backend: str) -> None:
    """Heavy contention (all rows into one token): atomics differ run to run, deterministic mode does not."""
    require_backend(backend)
    index = torch.zeros(1, 200_000, dtype=torch.long, device="cuda")
    src = torch.randn(1, 200_000, 64, device="cuda") * 1e3
    with _deterministic():
        runs = [sparsevit.scatter_add_tokens(src, index, 2, backend=backend) for _ in range(5)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    torch.testing.assert_close(runs[0], reference.scatter_add_tokens(src, index, 2), atol=1e-1, rtol=1e-4)
