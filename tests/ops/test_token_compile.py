"""torch.library.opcheck and torch.compile(fullgraph=True) through the token ops."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import backend_params, device_for, require_backend


def _inputs(dev: torch.device, dtype: torch.dtype = torch.float32):
    x = torch.randn(2, 7, 5, device=dev, dtype=dtype, requires_grad=True)
    index = torch.stack([torch.randperm(7, device=dev)[:4] for _ in range(2)])
    return x, index


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend: str, dtype: torch.dtype) -> None:
    require_backend(backend)
    dev = device_for(backend)
    x, index = _inputs(dev, dtype)
    src = torch.randn(2, 4, 5, device=dev, dtype=dtype, requires_grad=True)
    base = torch.randn(2, 7, 5, device=dev, dtype=dtype, requires_grad=True)
    ops = torch.ops.sparsevit
    torch.library.opcheck(ops.gather_tokens.default, (x, index, backend))
    torch.library.opcheck(ops.scatter_tokens.default, (src, index, base, backend))
    torch.library.opcheck(ops.scatter_add_tokens.default, (src, index, 7, backend))


def _model(x: torch.Tensor, index: torch.Tensor, scores: torch.Tensor, backend: str) -> torch.Tensor:
    kept = sparsevit.gather_tokens(x, index, backend=backend)
    restored = sparsevit.scatter_tokens(kept * 2, index, base=x, backend=backend)
    tokens, _ = sparsevit.select_tokens(restored, scores, 3, num_prefix=1, backend=backend)
    return tokens.sum() + sparsevit.scatter_add_tokens(kept, index, 7, backend=backend).pow(2).sum()


def _reference_model(x: torch.Tensor, index: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    kept = reference.gather_tokens(x, index)
    restored = reference.scatter_tokens(kept * 2, index, x)
    tokens, _ = reference.select_tokens(restored, scores, 3, 1)
    return tokens.sum() + reference.scatter_add_tokens(kept, index, 7).pow(2).sum()


COMPILERS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(backend: str, compiler: str) -> None:
    require_backend(backend)
    torch._dynamo.reset()
    dev = device_for(backend)
    x, index = _inputs(dev)
    scores = torch.randn(2, 6, device=dev)
    compiled = torch.compile(_model, fullgraph=True, backend=compiler)
    loss = compiled(x, index, scores, backend)
    (grad,) = torch.autograd.grad(loss, x)
    x_ref = x.detach().clone().requires_grad_()
    loss_ref = _reference_model(x_ref, index, scores)
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_compile_keeps_index_check() -> None:
    """Under torch.compile the range check stays in the graph as a device assert."""
    torch._dynamo.reset()
    x = torch.randn(2, 5, 3)
    bad = torch.tensor([[0, 9], [1, 2]])
    compiled = torch.compile(lambda a, i: sparsevit.gather_tokens(a, i, backend="torch"), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="index entries must lie"):
        compiled(x, bad)
