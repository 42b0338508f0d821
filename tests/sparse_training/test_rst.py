"""Dual LTH / RST: the λ schedule, exact random masks, the penalty gradient, penalised weights driven
to zero before removal and exactly zero after, bit-identical resume, block conversion, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from st_helpers import batch, tiny_vit
from torch import nn

from sparsevit.sparse_training import RandomSparseTransformation, rst_lambda, to_block_sparse


def test_lambda_schedule_steps_and_caps() -> None:
    got = [rst_lambda(t, 0.0, 0.1, 3, 0.25) for t in range(12)]
    assert got == pytest.approx([0, 0, 0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.25, 0.25, 0.25])
    assert rst_lambda(7, lambda_init=0.5, lambda_step=0.0, lambda_every=1, lambda_max=0.5) == 0.5


def test_penalty_property_follows_the_schedule_and_is_zero_after_removal() -> None:
    rst = RandomSparseTransformation(tiny_vit(), 0.5, lambda_init=0.01, lambda_step=0.02, lambda_every=2,
                                     lambda_max=0.05, penalty_steps=9)
    seen = []
    for _ in range(10):
        seen.append(rst.penalty)
        rst.step()
    assert seen[:9] == pytest.approx([0.01, 0.01, 0.03, 0.03, 0.05, 0.05, 0.05, 0.05, 0.05])
    assert rst.finalized and seen[9] == 0.0 and rst.penalty == 0.0


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("granularity", ["element", "block"])
def test_random_masks_have_the_exact_counts_and_leave_the_weights_dense(distribution: str, granularity: str) -> None:
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block = 16 if granularity == "block" else None
    rst = RandomSparseTransformation(model, 0.5, distribution=distribution, granularity=granularity,
                                     block_size=block, seed=3)
    for name, m in rst.masks().items():
        assert m.dtype == torch.bool
        assert int(m.sum()) == rst.manager.target_active(name)
    assert abs(rst.total_sparsity() - 0.5) < 0.02
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the penalty phase trains the dense network
    other = RandomSparseTransformation(tiny_vit(), 0.5, distribution=distribution, granularity=granularity,
                                       block_size=block, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(rst.masks().values(), other.masks().values()))
    same = RandomSparseTransformation(tiny_vit(), 0.5, distribution=distribution, granularity=granularity,
                                      block_size=block, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(rst.masks().values(), same.masks().values()))


def test_the_penalty_adds_lambda_w_outside_the_mask_to_the_gradient() -> None:
    plain = tiny_vit()
    model = copy.deepcopy(plain)
    rst = RandomSparseTransformation(model, 0.6, lambda_init=0.3, lambda_step=0.0, seed=1)
    x, y = batch()
    F.cross_entropy(plain(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    for name, layer in rst.manager.layers.items():
        w = layer.weight
        outside = ~layer.expand(rst.masks()[name])
        expected = plain.get_submodule(name).weight.grad + 0.3 * w.detach() * outside
        torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=1e-7)
    # parameters outside the sparsified layers are not penalised
    torch.testing.assert_close(model.head.weight.grad, plain.head.weight.grad)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _step(model: nn.Module, opt: torch.optim.Optimizer, rst: RandomSparseTransformation, t: int) -> None:
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    rst.step()


LINEAR = lambda n, m: isinstance(m, nn.Linear) and n != "4"  # noqa: E731


def test_penalised_weights_go_to_zero_then_are_removed_exactly() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rst = RandomSparseTransformation(model, 0.7, filter=LINEAR, lambda_step=0.5, lambda_every=2, lambda_max=5.0,
                                     penalty_steps=60, optimizer=opt)
    start = rst.penalised_norm()
    for t in range(59):
        _step(model, opt, rst, t)
    assert not rst.finalized
    assert rst.penalised_norm() < 1e-2 * start  # near zero before removal (the loss gradient balances λW)
    kept_norm = sum(float((l.weight.detach() * l.element_mask).norm()) for l in rst.manager)
    _step(model, opt, rst, 59)
    assert rst.finalized
    for name, layer in rst.manager.layers.items():
        assert torch.equal(layer.mask, rst.masks()[name])
        assert bool((layer.weight[~layer.element_mask] == 0).all())
    for t in range(60, 70):  # the sparse network trains on; the removed weights stay exactly zero
        _step(model, opt, rst, t)
    for layer in rst.manager:
        assert bool((layer.weight[~layer.element_mask] == 0).all())
        assert bool((layer.weight[layer.element_mask] != 0).all())
    assert kept_norm > 0.1


def _run(steps: range, model: nn.Module, opt: torch.optim.Optimizer, rst: RandomSparseTransformation) -> None:
    for t in steps:
        _step(model, opt, rst, t)


@pytest.mark.parametrize("stop", [4, 10])
def test_resume_is_bit_identical(stop: int) -> None:
    def fresh():
        model = _mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        rst = RandomSparseTransformation(model, 0.5, filter=LINEAR, lambda_step=0.05, lambda_every=2,
                                         penalty_steps=8, seed=5, optimizer=opt)
        return model, opt, rst

    model, opt, rst = fresh()
    _run(range(stop), model, opt, rst)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), rst.state_dict()))
    _run(range(stop, 14), model, opt, rst)
    model2, opt2, rst2 = fresh()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    rst2.load_state_dict(saved[2])
    assert rst2.steps == stop and rst2.finalized == (stop >= 8)
    _run(range(stop, 14), model2, opt2, rst2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert rst2.finalized and all(torch.equal(a, b) for a, b in zip(rst.masks().values(), rst2.masks().values()))


def test_bad_states_are_refused_without_change() -> None:
    rst = RandomSparseTransformation(_mlp(), 0.5, filter=LINEAR)
    good = rst.state_dict()
    masks = rst.masks()
    with pytest.raises(ValueError, match="format"):
        rst.load_state_dict({**good, "format": "other"})
    bad = copy.deepcopy(good)
    name = next(iter(bad["target_masks"]))
    bad["target_masks"][name] = bad["target_masks"][name].view(torch.uint8).clone().fill_(2).view(torch.bool)
    with pytest.raises(ValueError, match="0/1"):
        rst.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["schedule"]["lambda_step"] = -1.0
    with pytest.raises(ValueError, match="lambda_step"):
        rst.load_state_dict(bad)
    with pytest.raises(TypeError, match="state"):
        rst.load_state_dict([1, 2])  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(masks.values(), rst.masks().values()))


def test_block_rst_converts_to_block_sparse() -> None:
    model = tiny_vit()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rst = RandomSparseTransformation(model, 0.5, granularity="block", block_size=16, lambda_step=0.1,
                                     lambda_every=1, penalty_steps=2, optimizer=opt)
    for t in range(3):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rst.step()
    assert rst.finalized
    x, _ = batch(9)
    model.eval()
    with torch.no_grad():
        dense_out = model(x)
    report = to_block_sparse(model, rst.manager)
    assert report.converted
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"lambda_step": -1e-4}, "lambda_step"),
    ({"lambda_every": 0}, "lambda_every"),
    ({"lambda_init": -0.1}, "lambda_init"),
    ({"lambda_init": 0.5, "lambda_max": 0.1}, "lambda_max"),
    ({"lambda_max": float("inf")}, "lambda_max"),
    ({"penalty_steps": -1}, "penalty_steps"),
    ({"distribution": "er"}, "distribution"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RandomSparseTransformation(tiny_vit(), 0.5, **kwargs)


@pytest.mark.parametrize("sparsity", [1.0, -0.5, 2.0])
def test_bad_sparsity(sparsity: float) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        RandomSparseTransformation(tiny_vit(), sparsity)
    with pytest.raises(TypeError, match="lambda_every"):
        RandomSparseTransformation(tiny_vit(), 0.5, lambda_every=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        rst_lambda(-1)
