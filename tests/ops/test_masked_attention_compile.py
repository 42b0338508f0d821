"""Bad input, torch.library.opcheck and torch.compile(fullgraph=True) through the masked-attention ops."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference
from helpers import backend_params, device_for, require_backend


def _qkv(dev: torch.device, dtype: torch.dtype = torch.float32, n: int = 7, d: int = 16):
    return [torch.randn(2, 2, n, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("with_keep", [True, False], ids=["keep", "nokeep"])
def test_opcheck_attention(backend: str, with_keep: bool) -> None:
    require_backend(backend)
    dev = device_for(backend)
    q, k, v = _qkv(dev)
    keep = torch.rand(2, 7, device=dev, requires_grad=True) if with_keep else None
    ops = torch.ops.sparsevit
    for need_grad in (True, False):
        torch.library.opcheck(ops.masked_attention_fwd.default, (q, k, v, keep, 0.25, 1e-3, backend, need_grad))
    out, *stats = ops.masked_attention_fwd(q, k, v, keep, 0.25, 1e-3, backend, True)
    kd = None if keep is None else keep.detach()
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), kd, out.detach(), *stats, 0.25, 1e-3, backend)
    torch.library.opcheck(ops.masked_attention_bwd.default, args)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_attention_half(backend: str) -> None:
    """float16 inputs that need a gradient: the triton forward also returns its float32 output."""
    require_backend(backend)
    dev = device_for(backend)
    q, k, v = _qkv(dev, torch.float16)
    keep = torch.rand(2, 7, device=dev, requires_grad=True)
    ops = torch.ops.sparsevit
    torch.library.opcheck(ops.masked_attention_fwd.default, (q, k, v, keep, 0.25, 1e-3, backend, True))
    out, *stats = ops.masked_attention_fwd(q, k, v, keep, 0.25, 1e-3, backend, True)
    out32 = stats[-1]
    assert out32.shape == ((2, 2, 7, 16) if backend == "triton" else (0,)) and out32.dtype == torch.float32
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), keep.detach(), out.detach(), *stats,
            0.25, 1e-3, backend)
    torch.library.opcheck(ops.masked_attention_bwd.default, args)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "triton"])
def test_opcheck_softmax(backend: str) -> None:
    require_backend(backend)
    dev = device_for(backend)
    scores = torch.randn(2, 2, 6, 6, device=dev, requires_grad=True)
    keep = torch.rand(2, 6, device=dev, requires_grad=True)
    ops = torch.ops.sparsevit
    torch.library.opcheck(ops.masked_softmax_fwd.default, (scores, keep, 1e-3, backend))
    _, mw, lam = ops.masked_softmax_fwd(scores, keep, 1e-3, backend)
    torch.library.opcheck(ops.masked_softmax_bwd.default, (torch.randn_like(scores), scores.detach(), keep.detach(), mw, lam, 1e-3, backend))


def _model(q, k, v, keep, backend):
    out = sparsevit.masked_attention(q, k, v, keep, eps=1e-3, backend=backend)
    probs = sparsevit.masked_softmax(q @ k.transpose(-2, -1), keep, 1e-3, backend="torch")
    return (out * out).sum() + probs[:, :, 0].pow(2).sum()


def _reference_model(q, k, v, keep):
    out = reference.masked_attention(q, k, v, keep, None, 1e-3)
    probs = reference.masked_softmax(q @ k.transpose(-2, -1), keep, 1e-3)
    return (out * out).sum() + probs[:, :, 0].pow(2).sum()


COMPILERS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compile_fullgraph(backend: str, compiler: str) -> None:
    require_backend(backend)
    torch._dynamo.reset()
    dev = device_for(backend)
    q, k, v = _qkv(dev)
    keep = torch.rand(2, 7, device=dev, requires_grad=True)
    compiled = torch.compile(_model, fullgraph=True, backend=compiler)
    loss = compiled(q, k, v, keep, backend)
    grads = torch.autograd.grad(loss, [q, k, v, keep])
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, keep)]
    loss_ref = _reference_model(*leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-4)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def test_errors() -> None:
    q = torch.randn(2, 1, 4, 8)
    with pytest.raises(ValueError, match=r"q must have 4 dims \(B, H, N, D\)"):
        sparsevit.masked_attention(q[0], q, q)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        sparsevit.masked_attention(q, None, q)
    with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
        sparsevit.masked_attention(q.double(), q.double(), q.double())
    with pytest.raises(TypeError, match="v must have the dtype of q"):
        sparsevit.masked_attention(q, q, q.half())
    with pytest.raises(ValueError, match="k must have the shape of q"):
        sparsevit.masked_attention(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match=r"keep must be \(B, N\) = \(2, 4\)"):
        sparsevit.masked_attention(q, q, q, torch.ones(2, 3))
    with pytest.raises(ValueError, match="keep must have 2 dims"):
        sparsevit.masked_attention(q, q, q, torch.ones(2, 4, 1))
    with pytest.raises(ValueError, match="same device"):
        sparsevit.masked_attention(q, q, q, torch.ones(2, 4, device="meta"))
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        sparsevit.masked_attention(q, q, q, torch.ones(2, 4), eps=float("nan"))
    with pytest.raises(TypeError, match="scale must be a finite float"):
        sparsevit.masked_attention(q, q, q, scale="big")
    with pytest.raises(ValueError, match="cuda"):
        sparsevit.masked_attention(q, q, q, backend="cuda")
