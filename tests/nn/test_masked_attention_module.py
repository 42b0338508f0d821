"""MaskedAttention: a drop-in timm Attention with a keep mask and the class-token attention row."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import Attention

from sparsevit import reference
from sparsevit.nn import MaskedAttention

VARIANTS = [
    dict(),
    dict(qkv_bias=True),
    dict(qk_norm=True, norm_layer=nn.LayerNorm),
    dict(proj_bias=False, qkv_bias=True),
    dict(scale_norm=True, norm_layer=nn.LayerNorm),
    dict(attn_head_dim=12),
    dict(dim_out=20),
    dict(gated=True),
]


def _pair(kwargs: dict, dim: int = 24, heads: int = 3):
    torch.manual_seed(0)
    dense = Attention(dim, num_heads=heads, **kwargs).eval()
    torch.manual_seed(1)
    masked = MaskedAttention(dim, num_heads=heads, **kwargs).eval()
    return dense, masked


@pytest.mark.parametrize("kwargs", VARIANTS, ids=str)
def test_state_dict_loads_strict_and_output_matches(kwargs: dict) -> None:
    dense, masked = _pair(kwargs)
    assert list(dense.state_dict()) == list(masked.state_dict())
    masked.load_state_dict(dense.state_dict(), strict=True)
    dense.load_state_dict(masked.state_dict(), strict=True)
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(masked(x), dense(x), atol=0, rtol=0)
    mask = torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(masked(x, attn_mask=mask), dense(x, attn_mask=mask), atol=0, rtol=0)


def _manual(module: MaskedAttention, x: torch.Tensor, keep, eps: float):
    """q, k, v as timm computes them, attention by the reference, then the output path."""
    b, n, _ = x.shape
    qkv = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    out = reference.masked_attention(q, k, v, keep, module.scale, eps)
    out = module.norm(out.transpose(1, 2).reshape(b, n, module.attn_dim))
    if module.gate is not None:
        out = out * module.gate(x).sigmoid()
    scores = (q @ k.transpose(-2, -1)) * module.scale
    return module.proj(out), reference.masked_softmax(scores, keep, eps)[:, :, 0]


@pytest.mark.parametrize("kwargs", VARIANTS[:4], ids=str)
@pytest.mark.parametrize("kind", ["soft", "bool", "none"])
def test_keep_and_cls_attention(kwargs: dict, kind: str) -> None:
    _, module = _pair(kwargs)
    module.eps = 0.01
    x = torch.randn(2, 11, 24)
    keep = {"soft": torch.rand(2, 11), "bool": torch.rand(2, 11) > 0.5, "none": None}[kind]
    out, row = module(x, keep=keep, return_cls_attn=True)
    exp_out, exp_row = _manual(module, x, keep, 0.01 if keep is not None else 0.0)
    torch.testing.assert_close(out, exp_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(row, exp_row, atol=1e-6, rtol=1e-5)
    assert row.shape == (2, 3, 11)
    torch.testing.assert_close(row.sum(-1), torch.ones(2, 3), atol=1e-5, rtol=0)


def test_keep_attribute_and_recorded_row() -> None:
    """Inside an unmodified timm block the mask comes from the module attribute."""
    _, module = _pair({})
    x = torch.randn(1, 6, 24)
    keep = torch.rand(1, 6)
    expected, expected_row = module(x, keep=keep, return_cls_attn=True)
    module.keep = keep
    module.record_cls_attn = True
    torch.testing.assert_close(module(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(module.cls_attn, expected_row, atol=0, rtol=0)


def test_keep_gets_gradient_through_module() -> None:
    _, module = _pair({"qkv_bias": True})
    x = torch.randn(2, 7, 24)
    keep = torch.rand(2, 7, requires_grad=True)
    out, row = module(x, keep=keep, return_cls_attn=True)
    (out.pow(2).sum() + row[:, :, 1:].sum()).backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0


def test_training_dropout_uses_unfused_path() -> None:
    """Attention dropout needs the probabilities: masked softmax, dropout, then V."""
    _, module = _pair({})
    module.attn_drop.p = 0.5
    module.train()
    x = torch.randn(2, 5, 24)
    keep = torch.rand(2, 5, requires_grad=True)
    torch.manual_seed(3)
    out = module(x, keep=keep)
    b, n, _ = x.shape
    q, k, v = module.qkv(x).reshape(b, n, 3, 3, 8).permute(2, 0, 3, 1, 4).unbind(0)
    torch.manual_seed(3)
    attn = torch.nn.functional.dropout(reference.masked_softmax(q @ k.transpose(-2, -1) * module.scale, keep, 1e-6), 0.5)
    expected = module.proj((attn @ v).transpose(1, 2).reshape(b, n, 24))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0


def test_from_attention_shares_parameters() -> None:
    dense, _ = _pair({"qk_norm": True, "norm_layer": nn.LayerNorm})
    swapped = MaskedAttention.from_attention(dense, eps=1e-3)
    assert swapped.qkv.weight is dense.qkv.weight and swapped.eps == 1e-3
    x = torch.randn(2, 4, 24)
    torch.testing.assert_close(swapped(x), dense(x), atol=0, rtol=0)
    with pytest.raises(TypeError, match="timm.layers.Attention"):
        MaskedAttention.from_attention(nn.Linear(2, 2))


def test_errors() -> None:
    _, module = _pair({})
    x = torch.randn(2, 4, 24)
    with pytest.raises(ValueError, match="keep cannot be combined with attn_mask"):
        module(x, attn_mask=torch.ones(4, 4, dtype=torch.bool), keep=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"keep must be \(B, N\) = \(2, 4\)"):
        module(x, keep=torch.ones(2, 5))
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        MaskedAttention(24, num_heads=3, eps=-1.0)


@pytest.mark.parametrize("env", ["triton", "torch"])
def test_dropout_path_under_backend_env(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    """SPARSEVIT_BACKEND=triton names no masked_softmax kernel: the dropout path still runs
    (masked_softmax's automatic choice); the fused path without dropout uses triton."""
    _, module = _pair({})
    module.attn_drop.p = 0.5
    module.train()
    x = torch.randn(2, 5, 24)
    keep = torch.rand(2, 5, requires_grad=True)
    monkeypatch.setenv("SPARSEVIT_BACKEND", env)
    torch.manual_seed(3)
    out = module(x, keep=keep)
    monkeypatch.delenv("SPARSEVIT_BACKEND")
    torch.manual_seed(3)
    expected = module(x, keep=keep)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.sum().backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0
    monkeypatch.setenv("SPARSEVIT_BACKEND", env)
    module.eval()
    fused = module(x, keep=keep)
    monkeypatch.delenv("SPARSEVIT_BACKEND")
    torch.testing.assert_close(fused, module(x, keep=keep), atol=1e-5, rtol=1e-4)
