"""Peek-a-Boo stage 2: the Bop sign-flip rule on a hand-made gradient sequence, masks, fixed
magnitudes and kept set through training, frozen other parameters, and bad input."""

from __future__ import annotations

import pytest
import torch
from st_helpers import tiny_vit
from torch import nn

from sparsevit.sparse_training import PeekABoo, SignFlipOptimizer


def _reference_bop(w: list[float], grads: list[list[float]], gamma: float, tau: float,
                   mask: list[bool]) -> list[list[float]]:
    """The rule in plain Python floats: m ← (1−γ)m + γg; W ← −W where |m| > τ, sign m = sign W, mask."""
    m = [0.0] * len(w)
    out = []
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    for g in grads:
        for i in range(len(w)):
            m[i] = (1 - gamma) * m[i] + gamma * g[i] if mask[i] else 0.0
            if mask[i] and abs(m[i]) > tau and sign(m[i]) == sign(w[i]):
                w[i] = -w[i]
        out.append(list(w))
    return out


def _run(w0: list[float], grads: list[list[float]], gamma: float, tau: float,
         mask: list[bool] | None = None) -> tuple[list[list[float]], SignFlipOptimizer, list[int]]:
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = SignFlipOptimizer([p], gamma, tau, masks=None if mask is None else [torch.tensor(mask)])
    out, flips = [], []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().tolist())
        flips.append(opt.last_flips)
    return out, opt, flips


def test_flip_rule_on_a_hand_made_sequence() -> None:
    w0 = [0.5, -0.3, 0.2, -0.1]
    grads = [[0.4, -0.4, -0.4, 0.1], [0.0, 0.0, 0.0, -0.4], [-0.4, 0.0, 0.0, 0.0]]
    out, opt, flips = _run(w0, grads, gamma=0.5, tau=0.1)
    # step 1: m = [.2, -.2, -.2, .05]: w0 and w1 descend across zero -> flip; w2 disagrees; w3 too weak
    assert out[0] == [-0.5, 0.3, 0.2, -0.1]
    # step 2: m = [.1, -.1, -.1, -.175]: |m| = τ is not > τ; w3 agrees and is strong -> flip
    assert out[1] == [-0.5, 0.3, 0.2, 0.1]
    # step 3: m = [-.15, -.05, -.05, -.0875]: w0 (now negative) agrees -> flips back
    assert out[2] == [0.5, 0.3, 0.2, 0.1]
    assert flips == [2, 1, 1] and opt.total_flips == 4
    assert out == _reference_bop(list(w0), grads, 0.5, 0.1, [True] * 4)


def test_flip_rule_matches_the_reference_on_random_sequences() -> None:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(40, generator=g, dtype=torch.float64).tolist()
    grads = [torch.randn(40, generator=g, dtype=torch.float64).tolist() for _ in range(25)]
    mask = (torch.rand(40, generator=g) > 0.3).tolist()
    out, opt, _ = _run(w0, grads, gamma=0.2, tau=0.3, mask=mask)
    ref = _reference_bop(list(w0), grads, 0.2, 0.3, mask)
    torch.testing.assert_close(torch.tensor(out), torch.tensor(ref), rtol=0, atol=0)
    assert opt.total_flips > 0
    # magnitudes never change, masked entries never flip
    final = torch.tensor(out[-1])
    assert torch.equal(final.abs(), torch.tensor(w0).abs())
    keep = torch.tensor(mask)
    assert torch.equal(final[~keep], torch.tensor(w0)[~keep])


def test_exp_avg_is_zero_on_masked_entries_and_state_dict_round_trips() -> None:
    p = nn.Parameter(torch.tensor([1.0, -1.0, 2.0]))
    opt = SignFlipOptimizer([p], 0.5, 0.1, masks={p: torch.tensor([True, False, True])})
    p.grad = torch.tensor([0.3, 0.3, -0.3])
    opt.step()
    assert opt.state[p]["exp_avg"][1] == 0
    q = nn.Parameter(p.detach().clone())
    opt2 = SignFlipOptimizer([q], 0.5, 0.1)
    opt2.load_state_dict(opt.state_dict())
    torch.testing.assert_close(opt2.state[q]["exp_avg"], opt.state[p]["exp_avg"])


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan")])
def test_bad_gamma(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        SignFlipOptimizer([nn.Parameter(torch.ones(2))], gamma=gamma)


@pytest.mark.parametrize("tau", [0.0, -1e-8, float("inf"), float("nan")])
def test_bad_tau(tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        SignFlipOptimizer([nn.Parameter(torch.ones(2))], tau=tau)
    with pytest.raises(ValueError, match="tau"):
        PeekABoo(tiny_vit(), 0.5, tau=tau)


def test_bad_masks() -> None:
    p = nn.Parameter(torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape"):
        SignFlipOptimizer([p], masks=[torch.ones(3, 2, dtype=torch.bool)])
    with pytest.raises(TypeError, match="bool"):
        SignFlipOptimizer([p], masks=[torch.ones(2, 3)])
    with pytest.raises(ValueError, match="one entry per parameter"):
        SignFlipOptimizer([p], masks=[None, None])
    with pytest.raises(TypeError, match="gamma"):
        SignFlipOptimizer([p], gamma="0.1")  # type: ignore[arg-type]


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("score", ["magnitude", "snip"])
def test_peekaboo_learns_only_signs(score: str) -> None:
    model = tiny_vit()
    x, y = _data()
    others_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pab = PeekABoo(model, 0.6, score=score, data=(x[:16], y[:16]), gamma=0.5, tau=1e-4)
    masks0 = {n: m.clone() for n, m in pab.masks().items()}
    sparse_names = {f"{n}.weight" for n in pab.manager.layers}
    assert all(p.requires_grad == (n in sparse_names) for n, p in model.named_parameters())
    pab.fit(x, y, steps=6, batch_size=16, seed=0)
    assert pab.total_flips > 0 and 0 < pab.flipped_fraction() < 1
    assert len(pab.history) == 6
    for n, layer in pab.manager.layers.items():
        assert torch.equal(layer.weight.detach().abs(), pab.magnitudes[n])
        assert torch.equal(pab.masks()[n], masks0[n])
        assert bool((layer.weight[~layer.element_mask] == 0).all())
    for n, p in model.named_parameters():
        if n not in sparse_names:
            assert torch.equal(p.detach(), others_before[n]), n
    assert abs(pab.sparsity() - 0.6) < 0.01


def test_peekaboo_train_others_updates_the_rest() -> None:
    model = tiny_vit()
    x, y = _data()
    head_before = model.head.weight.detach().clone()
    pab = PeekABoo(model, 0.5, train_others=True, gamma=0.5, tau=1e-4)
    pab.fit(x, y, steps=3, batch_size=16)
    assert not torch.equal(model.head.weight.detach(), head_before)
    for n, layer in pab.manager.layers.items():
        assert torch.equal(layer.weight.detach().abs(), pab.magnitudes[n])


def test_peekaboo_fit_bad_input() -> None:
    pab = PeekABoo(tiny_vit(), 0.5)
    x, y = _data(8)
    with pytest.raises(ValueError, match="same length"):
        pab.fit(x, y[:4], steps=1)
    with pytest.raises(ValueError, match="steps"):
        pab.fit(x, y, steps=-1)
    with pytest.raises(TypeError, match="steps"):
        pab.fit(x, y, steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        pab.fit(x, y, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="sparsity"):
        PeekABoo(tiny_vit(), 1.0)
    with pytest.raises(ValueError, match="others_lr"):
        PeekABoo(tiny_vit(), 0.5, others_lr=0.0)
