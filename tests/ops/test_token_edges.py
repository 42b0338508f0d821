"""Token ops at the edges: empty dims (C, K, N, B = 0), 64-bit offsets, grids past a launch limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import backend_params, device_for, require_backend

# (B, N, C, K) with one or more zero dims; N = 0 only with K = 0 (no valid index exists).
EMPTY = [(2, 5, 0, 3), (2, 5, 4, 0), (0, 5, 4, 3), (2, 0, 4, 0), (2, 5, 0, 0), (0, 0, 0, 0)]


@pytest.mark.parametrize("shape", EMPTY, ids=str)
def test_reference_empty_dims(shape: tuple) -> None:
    """The references take every size the ops accept (C = 0 used to fail to reshape)."""
    b, n, c, k = shape
    x = torch.randn(b, n, c, requires_grad=True)
    index = torch.randint(0, max(n, 1), (b, k))
    out = reference.gather_tokens(x, index)
    assert out.shape == (b, k, c)
    src = torch.randn(b, k, c, requires_grad=True)
    placed = reference.scatter_tokens(src, index, x)
    assert placed.shape == (b, n, c)
    summed = reference.scatter_add_tokens(src, index, n)
    assert summed.shape == (b, n, c) and summed.dtype == src.dtype
    (out.sum() + placed.sum() + summed.sum()).backward()
    assert x.grad.shape == x.shape and src.grad.shape == src.shape


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", EMPTY, ids=str)
def test_ops_empty_dims(backend: str, shape: tuple) -> None:
    """Every op, forward and backward, on every backend, equals the reference with an empty dim."""
    require_backend(backend)
    dev = device_for(backend)
    b, n, c, k = shape
    index = torch.randint(0, max(n, 1), (b, k), device=dev)
    ops = [
        (lambda x, s: sparsevit.gather_tokens(x, index, backend=backend), lambda x, s: reference.gather_tokens(x, index)),
        (lambda x, s: sparsevit.scatter_tokens(s, index, base=x, check_index=False, backend=backend),
         lambda x, s: reference.scatter_tokens(s, index, x)),
        (lambda x, s: sparsevit.scatter_add_tokens(s, index, n, backend=backend),
         lambda x, s: reference.scatter_add_tokens(s, index, n)),
    ]
    for op, ref in ops:
        leaves = [torch.randn(b, n, c, device=dev), torch.randn(b, k, c, device=dev)]
        got_in = [t.clone().requires_grad_() for t in leaves]
        ref_in = [t.clone().requires_grad_() for t in leaves]
        got, want = op(*got_in), ref(*ref_in)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        grad = torch.randn_like(want)
        got_grads = torch.autograd.grad(got, got_in, grad, allow_unused=True)
        ref_grads = torch.autograd.grad(want, ref_in, grad, allow_unused=True)
        for g, r, t in zip(got_grads, ref_grads, leaves):
            g = torch.zeros_like(t) if g is None else g
            r = torch.zeros_like(t) if r is None else r
            torch.testing.assert_close(g, r, atol=0, rtol=0)


def _huge_channel_stride(dtype: torch.dtype, dev: torch.device, n: int = 8, c: int = 3) -> torch.Tensor:
    """x (1, n, c) whose channel stride 2³⁰ + 1 puts channel 2 past 2³¹ elements.

    A transposed (B, C, N) view with C·N ≥ 2³¹: the storage is reserved but only the
    3·n elements in use are written (on the CPU the rest is never touched).
    """
    stride = 2**30 + 1
    store = torch.empty(2 * stride + n, dtype=dtype, device=dev)
    for ch in range(c):
        store[ch * stride : ch * stride + n] = torch.randn(n, device=dev).to(dtype)
    return store.as_strided((1, n, c), (0, 1, stride))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A compact copy of a small view of a huge storage (channel by channel)."""
    return torch.stack([t[:, :, ch].clone() for ch in range(t.shape[2])], dim=-1)


def _run_isolated(check: str, *args: str) -> None:
    """Run ``check(*args)`` of this module in a fresh interpreter.

    A wrapped 32-bit offset reads or writes far outside the tensor: that crashes the
    process rather than failing an assert, so the checks run apart from the test session.
    """
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    call = f"import {Path(__file__).stem} as m; m.{check}(*{args!r})"
    done = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{check}{args} exited with {done.returncode}:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("backend", [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def test_offsets_past_2_31_elements(backend: str) -> None:
    """Channel offsets cols·stride ≥ 2³¹ are 64-bit: gather reads and scatter-add reads are right."""
    require_backend(backend)
    _run_isolated("_check_channel_offsets", backend)


def test_index_offsets_past_2_31_elements() -> None:
    """Index offsets k·stride ≥ 2³¹ are 64-bit too (a strided int8 index, kernel launcher)."""
    _run_isolated("_check_index_offsets")


def _check_channel_offsets(backend: str) -> None:
    dev = device_for(backend)
    x = _huge_channel_stride(torch.float16, dev)
    index = torch.tensor([[3, 0, 7, 7, 1]], device=dev)
    out = sparsevit.gather_tokens(x, index, backend=backend)
    torch.testing.assert_close(out, reference.gather_tokens(_dense(x), index), atol=0, rtol=0)
    src = _huge_channel_stride(torch.float16, dev, n=5)
    summed = sparsevit.scatter_add_tokens(src, index, 8, backend=backend)
    torch.testing.assert_close(summed, reference.scatter_add_tokens(_dense(src), index, 8), atol=0, rtol=0)
    base = torch.zeros(1, 8, 3, dtype=torch.float16, device=dev)
    placed = sparsevit.scatter_tokens(src, index, base=base, check_index=False, backend=backend)
    torch.testing.assert_close(placed, reference.scatter_tokens(_dense(src), index, base), atol=0, rtol=0)


def _check_index_offsets() -> None:
    from sparsevit.kernels import token_gather as kernels

    dev = device_for("triton")
    stride = 2**30 + 1
    store = torch.empty(2 * stride + 1, dtype=torch.int8, device=dev)  # reserved, not touched
    index = store.as_strided((1, 3), (0, stride))
    store[0], store[stride], store[2 * stride] = 4, 1, 2
    x = torch.randn(1, 6, 5, device=dev)
    want = reference.gather_tokens(x, torch.tensor([[4, 1, 2]], device=dev))
    torch.testing.assert_close(kernels.gather_tokens(x, index), want, atol=0, rtol=0)


class _GridSpy:
    """Stands in for a Triton kernel: records every launch grid, then launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid: tuple):
        self.grids.append(grid)
        return self.kernel[grid]


class _deterministic:
    """``torch.use_deterministic_algorithms(True)`` for a block, restored after."""

    def __enter__(self) -> None:
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc) -> None:
        torch.use_deterministic_algorithms(self.before)


def test_grid_chunks_past_the_launch_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grids past the axis limits run in chunks.  With a limit of 2 programs per axis, a small
    problem takes the path of K > 262,140 rows at C >= 1024: several launches over batch, token
    rows and channel blocks, none over the limit, together equal to the reference."""
    from sparsevit.kernels import token_gather as kernels

    monkeypatch.setattr(kernels, "MAX_GRID_DIM", 2)
    monkeypatch.setattr(kernels, "MAX_GRID_X", 2)
    spies = {}
    for name in ("_gather_tokens_kernel", "_scatter_tokens_kernel", "_segment_sum_kernel"):
        spies[name] = _GridSpy(getattr(kernels, name))
        monkeypatch.setattr(kernels, name, spies[name])
    dev = device_for("triton")
    b, n, k, c = 3, 9, 9, 2100  # 4 rows x 1024 channels per program: 3 row blocks, 3 channel blocks
    x = torch.randn(b, n, 2 * c, device=dev)[:, :, ::2]
    index = torch.randint(0, n, (b, k), device=dev)
    src = torch.randn(b, k, c, device=dev)
    distinct = torch.stack([torch.randperm(12, device=dev)[:k] for _ in range(b)])
    base = torch.randn(b, 12, c, device=dev)
    torch.testing.assert_close(
        sparsevit.gather_tokens(x, index, backend="triton"), reference.gather_tokens(x, index), atol=0, rtol=0
    )
    torch.testing.assert_close(
        sparsevit.scatter_add_tokens(src, index, n, backend="triton"), reference.scatter_add_tokens(src, index, n)
    )
    torch.testing.assert_close(
        sparsevit.scatter_tokens(src, distinct, base=base, backend="triton"),
        reference.scatter_tokens(src, distinct, base), atol=0, rtol=0,
    )
    with _deterministic():
        torch.testing.assert_close(
            sparsevit.scatter_add_tokens(src, index, n, backend="triton"),
            reference.scatter_add_tokens(src, index, n), atol=0, rtol=0,
        )
    for name, spy in spies.items():
        assert len(spy.grids) > 1, f"{name}: one launch, expected several chunks"
        assert all(0 < g <= 2 for grid in spy.grids for g in grid), f"{name}: grid over the limit: {spy.grids}"
    assert len(spies["_gather_tokens_kernel"].grids) == 2 * 2 * 2  # batch x rows x channels chunks


@pytest.mark.gpu
def test_gpu_grid_past_65535_row_blocks() -> None:
    """K > 262,140 rows at C = 1024: more than 65,535 row blocks on grid axis 1."""
    dev = torch.device("cuda")
    x = torch.randn(1, 1000, 1024, device=dev, dtype=torch.float16)
    index = torch.randint(0, 1000, (1, 300_000), device=dev)
    torch.testing.assert_close(sparsevit.gather_tokens(x, index, backend="triton"), reference.gather_tokens(x, index), atol=0, rtol=0)
