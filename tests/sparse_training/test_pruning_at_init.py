"""Pruning at initialisation: magnitude / SNIP / SynFlow scores against their formulas, the kept
counts of one-shot and iterative schedules (global and per layer, element and block), exact
masks, and clear errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from st_helpers import batch, tiny_vit
from torch import nn

from sparsevit.sparse_training import prune_at_init, pruning_scores

LINEAR = lambda name, module: isinstance(module, nn.Linear)  # noqa: E731 - every Linear, head included


def _mlp(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.ReLU(), nn.Linear(8, 5, bias=bias), nn.ReLU(),
                         nn.Linear(5, 3, bias=bias))


def _data(seed: int = 1, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_magnitude_scores_are_abs_weights() -> None:
    model = _mlp()
    s = pruning_scores(model, "magnitude", filter=LINEAR)
    assert set(s) == {"0", "2", "4"}
    for name, score in s.items():
        assert score.dtype == torch.float64
        torch.testing.assert_close(score, model.get_submodule(name).weight.detach().double().abs())


def test_snip_scores_match_weight_times_summed_gradient() -> None:
    model = _mlp()
    b1, b2 = _data(1), _data(2)
    s = pruning_scores(model, "snip", data=[b1, b2], filter=LINEAR)
    model.zero_grad()
    for x, y in (b1, b2):
        F.cross_entropy(model(x), y).backward()
    for name in ("0", "2", "4"):
        w = model.get_submodule(name).weight
        torch.testing.assert_close(s[name], (w.detach() * w.grad).abs().double(), rtol=1e-5, atol=1e-9)


def test_scoring_leaves_the_model_untouched() -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning_scores(model, "snip", data=_data(), filter=LINEAR)
    pruning_scores(model, "synflow", input_shape=(6,), filter=LINEAR)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.training


def test_synflow_scores_match_the_path_product_formula() -> None:
    # Bias-free ReLU MLP: R = 1ᵀ A3 A2 A1 1 with A_l = |W_l|, so ∂R/∂A1 = (A3 A2)ᵀ1 · 1ᵀ,
    # ∂R/∂A2 = A3ᵀ1 · (A1 1)ᵀ, ∂R/∂A3 = 1 · (A2 A1 1)ᵀ and S_l = A_l ⊙ ∂R/∂A_l.
    model = _mlp(bias=False)
    a1, a2, a3 = (model.get_submodule(n).weight.detach().double().abs() for n in ("0", "2", "4"))
    one_in, one_out = torch.ones(6, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    expected = {
        "0": a1 * torch.outer(a2.T @ (a3.T @ one_out), one_in),
        "2": a2 * torch.outer(a3.T @ one_out, a1 @ one_in),
        "4": a3 * torch.outer(one_out, a2 @ (a1 @ one_in)),
    }
    s = pruning_scores(model, "synflow", input_shape=(6,), filter=LINEAR)
    for name in expected:
        torch.testing.assert_close(s[name], expected[name], rtol=1e-12, atol=1e-14)
    # the example shape may also come from the data
    s2 = pruning_scores(model, "synflow", data=_data(), filter=LINEAR)
    for name in expected:
        torch.testing.assert_close(s2[name], expected[name], rtol=1e-12, atol=1e-14)


def test_synflow_on_a_vit_reads_the_input_shape_from_patch_embed() -> None:
    model = tiny_vit()
    s = pruning_scores(model, "synflow")
    assert s and all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())
    assert any(float(v.sum()) > 0 for v in s.values())


@pytest.mark.parametrize("score", ["magnitude", "snip", "synflow"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_one_shot_keeps_the_top_scores(score: str, scope: str) -> None:
    model = _mlp()
    data = _data()
    raw = pruning_scores(model, score, data=data, input_shape=(6,), filter=LINEAR)
    manager = prune_at_init(model, 0.6, score=score, data=data, input_shape=(6,), iterations=1, scope=scope,
                            filter=LINEAR)
    masks = manager.masks()
    if scope == "global":
        flat = torch.cat([raw[n].reshape(-1) for n in ("0", "2", "4")])
        k = round(0.4 * flat.numel())
        threshold = torch.sort(flat, descending=True).values[k - 1]
        assert sum(int(m.sum()) for m in masks.values()) == k
        for n in raw:
            assert bool((raw[n][masks[n]] >= threshold).all())
            assert bool((raw[n][~masks[n]] <= threshold).all())
    else:
        for n in raw:
            k = round(0.4 * raw[n].numel())
            assert int(masks[n].sum()) == k
            kth = torch.sort(raw[n].reshape(-1), descending=True).values[k - 1]
            assert bool((raw[n][masks[n]] >= kth).all())
    for n, m in masks.items():
        w = model.get_submodule(n).weight
        assert bool((w[~m] == 0).all())
        assert bool((w[m] != 0).all())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_iterative_magnitude_equals_one_shot(scope: str) -> None:
    one = _mlp()
    it = _mlp()
    m1 = prune_at_init(one, 0.75, iterations=1, scope=scope, filter=LINEAR).masks()
    m5 = prune_at_init(it, 0.75, iterations=5, scope=scope, filter=LINEAR).masks()
    for n in m1:
        assert torch.equal(m1[n], m5[n])


def test_iterative_synflow_reaches_the_density_and_nests_its_rounds() -> None:
    model = _mlp(bias=False)
    manager = prune_at_init(model, 0.8, score="synflow", input_shape=(6,), iterations=4, filter=LINEAR)
    total = sum(m.numel() for m in manager.masks().values())
    kept = sum(int(m.sum()) for m in manager.masks().values())
    assert kept == round(0.2 * total)
    assert math.isclose(manager.total_sparsity(), 1 - kept / total)
    # the default schedule of synflow is 100 rounds; the result still has the exact count
    model2 = _mlp(bias=False)
    kept2 = sum(int(m.sum()) for m in prune_at_init(model2, 0.8, score="synflow", input_shape=(6,),
                                                    filter=LINEAR).masks().values())
    assert kept2 == kept


def test_iterative_snip_rescores_the_pruned_network() -> None:
    data = _data(3, 32)
    a, b = _mlp(4), _mlp(4)
    one = prune_at_init(a, 0.9, score="snip", data=data, iterations=1, filter=LINEAR).masks()
    many = prune_at_init(b, 0.9, score="snip", data=data, iterations=6, filter=LINEAR).masks()
    assert sum(int(m.sum()) for m in one.values()) == sum(int(m.sum()) for m in many.values())
    assert any(not torch.equal(one[n], many[n]) for n in one)


def test_block_granularity_scores_blocks_by_their_mean() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    raw = pruning_scores(model, "magnitude", filter=LINEAR)
    manager = prune_at_init(model, 0.5, granularity="block", block_size=16, scope="layer", filter=LINEAR)
    for n, layer in manager.layers.items():
        unit = layer.local_mask
        means = raw[n].reshape(raw[n].shape[0] // 16, 16, raw[n].shape[1] // 16, 16).mean(dim=(1, 3))
        k = int(unit.sum())
        assert k == round(0.5 * unit.numel())
        assert float(means[unit].min()) >= float(means[~unit].max())
        elem = layer.element_mask
        assert torch.equal(elem, unit.repeat_interleave(16, 0).repeat_interleave(16, 1))
        assert bool((layer.weight[~elem] == 0).all())


def test_pruned_weights_get_zero_gradients_and_default_filter_skips_stem_and_head() -> None:
    model = tiny_vit()
    manager = prune_at_init(model, 0.5)
    assert all("head" not in n and "patch_embed" not in n for n in manager.layers)
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    for layer in manager:
        assert bool((layer.weight.grad[~layer.element_mask] == 0).all())


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity_is_a_value_error(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        prune_at_init(_mlp(), sparsity, filter=LINEAR)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(TypeError, match="sparsity"):
        prune_at_init(_mlp(), "0.5", filter=LINEAR)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score"):
        prune_at_init(_mlp(), 0.5, score="grasp", filter=LINEAR)
    with pytest.raises(ValueError, match="iterations"):
        prune_at_init(_mlp(), 0.5, iterations=0, filter=LINEAR)
    with pytest.raises(TypeError, match="iterations"):
        prune_at_init(_mlp(), 0.5, iterations=2.0, filter=LINEAR)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope"):
        prune_at_init(_mlp(), 0.5, scope="net", filter=LINEAR)
    with pytest.raises(ValueError, match="data"):
        prune_at_init(_mlp(), 0.5, score="snip", filter=LINEAR)
    with pytest.raises(TypeError, match="data"):
        pruning_scores(_mlp(), "snip", data=torch.randn(3, 6), filter=LINEAR)
    with pytest.raises(ValueError, match="input_shape"):
        pruning_scores(_mlp(), "synflow", filter=LINEAR)
    with pytest.raises(TypeError, match="input_shape"):
        pruning_scores(_mlp(), "synflow", input_shape=(6.0,), filter=LINEAR)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no layer"):
        pruning_scores(_mlp(), filter=lambda n, m: False)
    with pytest.raises(TypeError, match="model"):
        prune_at_init("model", 0.5)  # type: ignore[arg-type]
