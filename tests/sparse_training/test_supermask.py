"""Supermasks (edge-popup): frozen signed-constant weights, exact top-k per layer, straight-through
score gradients (per weight and per block), and that training scores moves the mask only."""

from __future__ import annotations

import math

import pytest
import torch
from st_helpers import batch, tiny_vit
from torch import nn

from sparsevit.sparse_training import SupermaskLayer, convert_to_supermask, supermask_layers, topk_straight_through


def test_convert_freezes_weights_signed_constant() -> None:
    model = convert_to_supermask(tiny_vit(), 0.5)
    layers = supermask_layers(model)
    assert sorted(layers) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scores") for n in trainable)
    for layer in layers.values():
        w = layer.inner.weight
        sigma = math.sqrt(2.0 / w.shape[1])
        assert torch.allclose(w.abs(), torch.full_like(w, sigma))
        assert (w > 0).any() and (w < 0).any()


@pytest.mark.parametrize("granularity,block", [("element", None), ("block", 16)])
def test_forward_uses_exact_top_k(granularity: str, block) -> None:
    model = convert_to_supermask(tiny_vit(), 0.7, granularity=granularity, block_size=block)
    for layer in supermask_layers(model).values():
        units = layer.scores.numel()
        assert int(layer.unit_mask().sum()) == round(0.3 * units)
        w = layer.effective_weight().detach()
        kept = layer.unit_mask()
        if block:
            assert layer.block_mask().shape == (layer.inner.weight.shape[0] // 16, layer.inner.weight.shape[1] // 16)
            kept = kept.repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert bool((w[~kept] == 0).all()) and bool((w[kept] != 0).all())
        top = layer.scores.detach().abs().flatten().sort(descending=True).values
        k = layer.k
        assert layer.scores.detach().abs()[layer.unit_mask()].min() >= top[k - 1]


@pytest.mark.parametrize("block", [None, 16])
def test_straight_through_gradient(block) -> None:
    torch.manual_seed(0)
    layer = SupermaskLayer(nn.Linear(32, 48), 0.4, block)
    x = torch.randn(5, 32)
    target = torch.randn(5, 48)
    ((layer(x) - target) ** 2).sum().backward()
    # by hand: dL/dW̃ from the masked product, dL/dh = dL/dW̃ ⊙ W, summed per block, times sign(s)
    w_eff = layer.effective_weight().detach().requires_grad_(True)
    ((nn.functional.linear(x, w_eff, layer.inner.bias) - target) ** 2).sum().backward()
    dh = w_eff.grad * layer.inner.weight
    if block:
        dh = dh.reshape(48 // block, block, 32 // block, block).sum(dim=(1, 3))
    torch.testing.assert_close(layer.scores.grad, dh * layer.scores.detach().sign(), rtol=1e-5, atol=1e-6)
    assert layer.inner.weight.grad is None


def test_topk_straight_through_is_identity_backward() -> None:
    s = torch.tensor([0.1, 0.5, 0.3, 0.9], requires_grad=True)
    h = topk_straight_through(s, 2)
    assert h.tolist() == [0.0, 1.0, 0.0, 1.0]
    (h * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert s.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_training_scores_moves_mask_not_weights() -> None:
    model = convert_to_supermask(tiny_vit(), 0.5)
    layers = supermask_layers(model)
    w0 = {n: l.inner.weight.clone() for n, l in layers.items()}
    m0 = {n: l.unit_mask().clone() for n, l in layers.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
    for t in range(5):
        x, y = batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.equal(w0[n], l.inner.weight) for n, l in layers.items())
    assert any(not torch.equal(m0[n], l.unit_mask()) for n, l in layers.items())


def test_conv2d_supermask() -> None:
    layer = SupermaskLayer(nn.Conv2d(16, 32, 3, padding=1), 0.5, 16)
    assert layer.block_mask().shape == (2, 9)
    out = layer(torch.randn(2, 16, 8, 8))
    assert out.shape == (2, 32, 8, 8)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        convert_to_supermask(tiny_vit(), 1.0)
    with pytest.raises(ValueError, match="block_size=64 must divide"):
        convert_to_supermask(tiny_vit(), 0.5, granularity="block", block_size=64)
    with pytest.raises(TypeError, match="inner must be an nn.Linear or nn.Conv2d"):
        SupermaskLayer(nn.LayerNorm(4), 0.5)
    with pytest.raises(ValueError, match="score per weight"):
        SupermaskLayer(nn.Linear(4, 4), 0.5).block_mask()
    with pytest.raises(ValueError, match="filter selected no"):
        convert_to_supermask(tiny_vit(), 0.5, filter=lambda n, m: False)
