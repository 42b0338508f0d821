"""The mask manager: layer selection, exact sparsity, exact zeros after optimizer steps,
masked gradients, block granularity, model state kept clean, and bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from st_helpers import batch, tiny_vit, train_step
from torch import nn

from sparsevit.sparse_training import MaskManager, default_filter

VIT_LAYERS = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_default_filter_on_timm_vit() -> None:
    m = MaskManager(tiny_vit(), 0.5)
    assert list(m.layers) == VIT_LAYERS  # no patch_embed.proj, no head, no norms / biases / embeddings


def test_default_filter_rules() -> None:
    assert default_filter("features.0", nn.Conv2d(3, 8, 3))
    assert not default_filter("fc", nn.Linear(4, 4))
    assert default_filter("layer1.fc", nn.Linear(4, 4))
    assert not default_filter("stem.conv", nn.Conv2d(3, 8, 3))
    assert not default_filter("norm", nn.LayerNorm(4))


@pytest.mark.parametrize("dist", ["uniform", "erk"])
@pytest.mark.parametrize("granularity,block", [("element", None), ("block", 16), ("block", 32)])
def test_exact_sparsity_at_init(dist: str, granularity: str, block) -> None:
    m = MaskManager(tiny_vit(), 0.8, distribution=dist, granularity=granularity, block_size=block)
    for name, layer in m.layers.items():
        assert layer.active() == m.target_active(name)
        w = layer.weight
        assert torch.equal(w == 0, ~layer.element_mask | (w == 0))  # masked entries are exactly zero
        assert bool((w[~layer.element_mask] == 0).all())
    # exact total: Σ kept units = round(Σ d_l · units_l)
    units = sum(layer.num_units for layer in m)
    exact = sum(m.densities[n] * layer.num_units for n, layer in m.layers.items())
    assert sum(layer.active() for layer in m) == round(exact)
    if dist == "uniform":
        assert m.total_sparsity() == pytest.approx(0.8, abs=0.5 / units)


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_masked_weights_stay_zero_and_grads_are_masked(opt_name: str) -> None:
    model = tiny_vit()
    opts = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    }
    opt = opts[opt_name](model.parameters())
    m = MaskManager(model, 0.9, optimizer=opt)
    # Momentum that would move masked weights: fill state with junk, then step.
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for layer in m:
            assert bool((layer.weight.grad[~layer.element_mask] == 0).all())
            assert layer.weight.grad[layer.element_mask].abs().sum() > 0
        opt.step()
        for layer in m:
            assert bool((layer.weight[~layer.element_mask] == 0).all())
            assert layer.active() == m.target_active(layer.name)


def test_block_mask_shapes_and_expansion() -> None:
    m = MaskManager(tiny_vit(), 0.5, distribution="uniform", granularity="block", block_size=16)
    qkv = m.layers["blocks.0.attn.qkv"]
    bm = m.block_mask("blocks.0.attn.qkv")
    assert bm.dtype == torch.bool and bm.shape == (96 // 16, 32 // 16)
    assert torch.equal(qkv.element_mask, bm.repeat_interleave(16, 0).repeat_interleave(16, 1))
    assert m.block_mask("blocks.0.mlp.fc2").shape == (32 // 16, 128 // 16)
    # pooled scores: the mean |w| per block
    w = torch.arange(96 * 32, dtype=torch.float32).reshape(96, 32)
    assert qkv.pool(w)[1, 1] == w[16:32, 16:32].mean()


def test_block_granularity_conv2d() -> None:
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 16, 1))
    m = MaskManager(model, 0.5, distribution="uniform", granularity="block", block_size=16)
    assert m.block_mask("0").shape == (2, 9)  # (32, 16·3·3) / 16
    assert m.block_mask("2").shape == (1, 2)
    for layer in m:
        assert layer.active() == m.target_active(layer.name)
        assert bool((layer.weight[~layer.element_mask] == 0).all())


def test_element_mask_not_convertible() -> None:
    m = MaskManager(tiny_vit(), 0.5)
    with pytest.raises(ValueError, match="element granularity"):
        m.block_mask("blocks.0.attn.qkv")


def test_model_stays_clean() -> None:
    model = tiny_vit()
    keys = list(model.state_dict())
    m = MaskManager(model, 0.9, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    x, _ = batch(0)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    m.remove()


def test_magnitude_init_keeps_largest() -> None:
    model = nn.Sequential(nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(32, dtype=torch.float32).reshape(4, 8) - 16)
    m = MaskManager(model, 0.75, distribution="uniform", init="magnitude", filter=lambda n, mod: isinstance(mod, nn.Linear))
    kept = model[0].weight[m.layers["0"].element_mask].abs()
    assert sorted(kept.tolist()) == [12.0, 13.0, 13.0, 14.0, 14.0, 15.0, 15.0, 16.0]


def test_bad_input() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        MaskManager(model, 1.0)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        MaskManager(model, -0.5)
    with pytest.raises(ValueError, match="block_size=64 must divide both dims of layer 'blocks.0.attn.qkv'"):
        MaskManager(model, 0.5, granularity="block", block_size=64)
    with pytest.raises(ValueError, match="block_size must be one of"):
        MaskManager(model, 0.5, granularity="block", block_size=8)
    with pytest.raises(TypeError, match="block_size must be an int"):
        MaskManager(model, 0.5, granularity="block")
    with pytest.raises(ValueError, match="granularity must be one of"):
        MaskManager(model, 0.5, granularity="row")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        MaskManager("vit", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="filter selected no layer"):
        MaskManager(model, 0.5, filter=lambda n, m: False)
    other = tiny_vit(1)
    with pytest.raises(ValueError, match="optimizer does not hold the weights of the sparsified layers"):
        MaskManager(model, 0.5, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        MaskManager(model, 0.5).attach(object())  # type: ignore[arg-type]


def test_train_step_helper_runs() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m = MaskManager(model, 0.5, optimizer=opt)
    train_step(model, opt, 0)
    assert m.total_sparsity() == pytest.approx(0.5, abs=0.01)
