"""RigL / SET / static: schedule, drop by |w| and grow by |grad| (hand-checked), exact sparsity
after every update, grown weights and their optimizer state zero, dense gradients only on update steps."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from st_helpers import tiny_vit, train_step
from torch import nn

from sparsevit.sparse_training import SET, RigL, StaticSparse, cosine_drop_fraction


class Toy(nn.Module):
    """loss = Σ W ⊙ G, so ∂L/∂W = G exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return (self.weight * g).sum()


def test_cosine_drop_fraction() -> None:
    assert cosine_drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_drop_fraction(25, 100, 0.3) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert cosine_drop_fraction(100, 100, 0.3) == 0.0


def test_update_steps_and_dense_grad_only_on_them() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rigl = RigL(model, opt, 0.8, delta_t=3, t_end=7)
    assert [t for t in range(1, 16) if rigl.is_update_step(t)] == [3, 6]
    updated = []
    for t in range(1, 8):
        assert rigl.manager.collect_dense_grads == (t in (3, 6))
        train_step(model, opt, t)
        assert bool(rigl.manager.dense_grads) == (t in (3, 6))
        updated.append(rigl.step())
        assert not rigl.manager.dense_grads
    assert [t for t, u in zip(range(1, 8), updated) if u] == [3, 6]


def test_drop_by_magnitude_grow_by_gradient_hand_checked() -> None:
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rigl = RigL(model, opt, 0.5, delta_t=1, t_end=100, alpha=0.3, distribution="uniform", filter=lambda n, m: n == "")
    layer = rigl.manager.layers[""]
    old = layer.mask.clone()
    active = old.flatten().nonzero().flatten().tolist()
    inactive = (~old).flatten().nonzero().flatten().tolist()
    assert len(active) == 8
    w = torch.zeros(16)
    for rank, i in enumerate(active):  # active magnitudes 1..8, alternating signs
        w[i] = (rank + 1) * (-1) ** rank
    with torch.no_grad():
        model.weight.copy_(w.reshape(4, 4))
    g = torch.zeros(16)
    for rank, i in enumerate(inactive):  # inactive gradients 10..80, negative
        g[i] = -10.0 * (rank + 1)
    g[active[0]] = 1000.0  # dropped for its small |w|, but its huge gradient regrows it at once
    opt.zero_grad()
    model(g.reshape(4, 4)).backward()
    assert bool((model.weight.grad.flatten()[inactive] == 0).all())  # masked gradient
    opt.step()
    assert rigl.step()
    k = int(cosine_drop_fraction(1, 100, 0.3) * 8)
    assert k == 2
    expected = torch.zeros(16, dtype=torch.bool)
    expected[active[k:]] = True  # the two smallest |w| (1, 2) are dropped
    expected[active[0]] = True  # regrown: the largest |grad| among inactive-after-drop
    expected[inactive[-1]] = True  # then the largest |grad| (80) among the originally inactive
    assert torch.equal(layer.mask.flatten(), expected)
    # dropped and regrown in one update: the connection never changed, so it keeps its value
    # (as in the paper's code: "new" means inactive before the update)
    assert model.weight.flatten()[active[0]] == 1.0
    assert model.weight.flatten()[inactive[-1]] == 0.0  # grown weights start at 0
    assert model.weight.flatten()[active[1]] == 0.0  # dropped
    assert layer.active() == 8


@pytest.mark.parametrize("cls", [RigL, SET])
@pytest.mark.parametrize("granularity,block", [("element", None), ("block", 16)])
def test_exact_sparsity_after_every_update(cls, granularity: str, block) -> None:
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    alg = cls(model, opt, 0.5 if block else 0.8, delta_t=2, t_end=8, granularity=granularity, block_size=block)
    targets = {n: alg.manager.target_active(n) for n in alg.manager.layers}
    total = alg.manager.total_sparsity()
    first = {n: m.clone() for n, m in alg.manager.masks().items()}
    for t in range(1, 9):
        train_step(model, opt, t)
        alg.step()
        for name, layer in alg.manager.layers.items():
            assert layer.active() == targets[name]
            assert bool((layer.weight[~layer.element_mask] == 0).all())
            if block:
                assert torch.equal(layer.element_mask, layer.expand(layer.block_mask()))
        assert alg.manager.total_sparsity() == total
    assert len(alg.history) == 3
    assert any(not torch.equal(first[n], m) for n, m in alg.manager.masks().items())  # the masks moved


def test_static_never_changes() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    alg = StaticSparse(model, opt, 0.9)
    first = {n: m.clone() for n, m in alg.manager.masks().items()}
    for t in range(1, 6):
        train_step(model, opt, t)
        assert not alg.step()
        assert not alg.manager.collect_dense_grads
    assert all(torch.equal(first[n], m) for n, m in alg.manager.masks().items())


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("cls", [RigL, SET])
def test_regrown_weights_and_optimizer_state_zero(opt_name: str, cls) -> None:
    model = tiny_vit()
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2),
    }
    opt = make[opt_name](model.parameters())
    alg = cls(model, opt, 0.7, delta_t=2, t_end=20)
    train_step(model, opt, 1)
    alg.step()
    train_step(model, opt, 2)
    # Junk in every state tensor, so a missing reset cannot pass by accident.
    for layer in alg.manager:
        for v in opt.state[layer.weight].values():
            if isinstance(v, torch.Tensor) and v.shape == layer.weight.shape:
                v.add_(1.0)
    old = {n: l.element_mask.clone() for n, l in alg.manager.layers.items()}
    assert alg.step()
    grown_any = 0
    for name, layer in alg.manager.layers.items():
        grown = layer.element_mask & ~old[name]
        grown_any += int(grown.sum())
        assert bool((layer.weight[grown] == 0).all())
        shaped = [v for v in opt.state[layer.weight].values() if isinstance(v, torch.Tensor) and v.shape == layer.weight.shape]
        assert len(shaped) == {"sgd": 1, "adam": 3, "adamw": 2}[opt_name]
        for v in shaped:
            assert bool((v[grown] == 0).all())
            assert bool((v[layer.element_mask & old[name]] >= 0.5).all() or opt_name == "sgd")
    assert grown_any > 0


def test_bad_input() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="t_end"):
        RigL(model, opt, 0.9)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        RigL(model, opt, 1.0, t_end=10)
    with pytest.raises(ValueError, match="optimizer does not hold the weights"):
        RigL(model, torch.optim.SGD(tiny_vit(1).parameters(), lr=0.1), 0.9, t_end=10)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        RigL(model, None, 0.9, t_end=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delta_t must be >= 1"):
        SET(model, opt, 0.9, delta_t=0, t_end=10)
    with pytest.raises(ValueError, match="block_size=128 must divide"):
        RigL(model, opt, 0.9, t_end=10, granularity="block", block_size=128)
    with pytest.raises(ValueError, match="alpha"):
        RigL(model, opt, 0.9, t_end=10, alpha=2.0)


def test_missing_dense_gradient_is_reported() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, 0.9, delta_t=1, t_end=10)
    with pytest.raises(RuntimeError, match="no dense gradient was recorded"):
        rigl.step()  # no backward before the update step


@pytest.mark.parametrize("granularity,block", [("element", None), ("block", 16)])
def test_rigl_on_conv2d(granularity: str, block) -> None:
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rigl = RigL(model, opt, 0.5, delta_t=1, t_end=5, distribution="uniform", granularity=granularity, block_size=block)
    targets = {n: rigl.manager.target_active(n) for n in rigl.manager.layers}
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(4, 16, 6, 6, generator=g)).pow(2).sum().backward()
        opt.step()
        assert rigl.step()
        for name, layer in rigl.manager.layers.items():
            assert layer.active() == targets[name]
            assert bool((layer.weight[~layer.element_mask] == 0).all())


def test_dense_gradient_accumulates_over_micro_batches() -> None:
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rigl = RigL(model, opt, 0.5, delta_t=1, t_end=10, distribution="uniform", filter=lambda n, m: n == "")
    g1, g2 = torch.randn(4, 4), torch.randn(4, 4)
    model(g1).backward()
    model(g2).backward()
    mask = rigl.manager.layers[""].element_mask
    torch.testing.assert_close(rigl.manager.dense_grads[""], g1 + g2)
    torch.testing.assert_close(model.weight.grad, (g1 + g2) * mask)


class _Frozen(nn.Module):
    """Two Linears the default filter picks; ``frozen`` does not train."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(32, 32)
        self.trained = nn.Linear(32, 16)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(torch.relu(self.frozen(x)))


def test_frozen_layer_is_skipped_by_the_default_filter() -> None:
    """Before: a raw 'cannot register a hook' RuntimeError naming no layer."""
    model = _Frozen()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rigl = RigL(model, opt, 0.5, delta_t=1, t_end=5, distribution="uniform")
    assert list(rigl.manager.layers) == ["trained"] and rigl.manager.skipped_frozen == ["frozen"]
    frozen_before = model.frozen.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 32)).square().sum().backward()
        opt.step()
        assert rigl.step()
    assert torch.equal(model.frozen.weight, frozen_before)  # never masked, never touched


def test_frozen_layer_chosen_by_a_filter_is_a_clear_error() -> None:
    model = _Frozen()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"layer 'frozen'.*requires_grad=False"):
        RigL(model, opt, 0.5, t_end=5, filter=lambda n, m: isinstance(m, nn.Linear))


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(32, 32)
        self.unused = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_layer_without_gradient_grows_with_zero_scores() -> None:
    """Before: a misleading 'call backward() then step() exactly once' at the first update.

    A layer that got no gradient (unused in forward) is scored with a zero gradient, as
    SET would score it with random numbers: the update goes on, with a warning naming it.
    """
    model = _Unused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, 0.5, delta_t=1, t_end=5, distribution="uniform")
    targets = {n: rigl.manager.target_active(n) for n in rigl.manager.layers}
    old_used = rigl.manager.layers["used"].mask.clone()
    for step in range(2):
        opt.zero_grad()
        model(torch.randn(4, 32)).square().sum().backward()
        opt.step()
        if step == 0:
            with pytest.warns(UserWarning, match=r"\['unused'\] received no gradient"):
                assert rigl.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # named once, not on every update
                assert rigl.step()
    for name, layer in rigl.manager.layers.items():
        assert layer.active() == targets[name]
        assert bool((layer.weight[~layer.element_mask] == 0).all())
    assert not torch.equal(rigl.manager.layers["used"].mask, old_used)


def test_no_gradient_at_all_is_still_an_error() -> None:
    model = _Unused()
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, delta_t=1, t_end=5)
    with pytest.raises(RuntimeError, match=r"no dense gradient was recorded for any layer.*backward\(\)"):
        rigl.step()
