"""train_block_sparse Linears take what nn.Linear takes: a single vector, and autocast regions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsevit.sparse_training import MaskManager, train_block_sparse


def _pair(backend: str) -> tuple[nn.Linear, nn.Linear]:
    """A block-masked Linear routed through the kernels, and a plain nn.Linear with its weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    manager = MaskManager(model, 0.5, granularity="block", block_size=16, distribution="uniform")
    dense = copy.deepcopy(model[0])  # the masked weights: entries off the kept blocks are zero
    report = train_block_sparse(manager, backend=backend)
    assert report.converted
    return model[0], dense


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_dimensional_input(backend: str) -> None:
    sparse, dense = _pair(backend)
    x = torch.randn(32, requires_grad=True)
    y = sparse(x)
    assert y.shape == (48,)
    torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-4)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_dense,) = torch.autograd.grad(dense(x).sum(), x)
    torch.testing.assert_close(gx, gx_dense, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 32), (2, 5, 32), (32,)], ids=str)
def test_autocast_matches_nn_linear(backend: str, input_dtype: torch.dtype, shape: tuple) -> None:
    """Under CPU bf16 autocast: bf16 output (also for fp32 input), no dtype error, fp32 weight grads."""
    sparse, dense = _pair(backend)
    x = torch.randn(*shape).to(input_dtype)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        y = sparse(x)
        want = dense(x)
    assert want.dtype == torch.bfloat16  # what nn.Linear does
    assert y.dtype == want.dtype and y.shape == want.shape
    torch.testing.assert_close(y.float(), want.float(), atol=3e-2, rtol=2e-2)
    y.float().sum().backward()
    want.float().sum().backward()
    assert sparse.weight.grad.dtype == torch.float32 and sparse.bias.grad.dtype == torch.float32
    mask = dense.weight.detach() != 0  # the kept entries: the kernels give dW only there
    torch.testing.assert_close(sparse.weight.grad[mask], dense.weight.grad[mask], atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, atol=5e-2, rtol=2e-2)
