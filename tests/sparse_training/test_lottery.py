"""Lottery tickets (IMP): pruning per round (global / per layer, element / block), exact rewinding
to θ0 or θk on the survivors, the random-reinit control, per-round records, the built-in loop."""

from __future__ import annotations

import pytest
import torch
from st_helpers import tiny_vit, train_step

from sparsevit.sparse_training import LotteryTicket, fit, load_ticket


def _train(model, ticket, steps, start=1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ticket.attach(opt)
    for t in range(start, start + steps):
        train_step(model, opt, t)
        ticket.on_step(t)


@pytest.mark.parametrize("rewind_step", [0, 2])
def test_rewind_restores_theta_k_exactly_on_survivors(rewind_step: int) -> None:
    model = tiny_vit()
    ticket = LotteryTicket(model, 0.5, rewind_step=rewind_step)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, ticket, 4)
    theta_k = ticket.rewind_state
    if rewind_step == 0:
        assert all(torch.equal(theta0[k], theta_k[k]) for k in theta0)
    else:
        assert not all(torch.equal(theta0[k], theta_k[k]) for k in theta0)
    ticket.prune()
    ticket.rewind()
    for k, v in model.state_dict().items():
        name = k[: -len(".weight")]
        if k.endswith(".weight") and name in ticket.manager.layers:
            mask = ticket.manager.layers[name].element_mask
            assert torch.equal(v[mask], theta_k[k][mask])
            assert bool((v[~mask] == 0).all())
        else:
            assert torch.equal(v, theta_k[k]), k


def test_rewind_point_missing() -> None:
    ticket = LotteryTicket(tiny_vit(), 0.5, rewind_step=3)
    with pytest.raises(RuntimeError, match="no rewind point"):
        ticket.rewind()


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("granularity,block", [("element", None), ("block", 16)])
def test_prune_fraction_per_round(scope: str, granularity: str, block) -> None:
    model = tiny_vit()
    ticket = LotteryTicket(model, 0.2, scope=scope, granularity=granularity, block_size=block)
    layers = ticket.manager.layers
    for _ in range(3):
        before = {n: l.mask.clone() for n, l in layers.items()}
        scores = {n: l.pool(l.weight) for n, l in layers.items()}
        active = {n: int(m.sum()) for n, m in before.items()}
        ticket.prune()
        after = {n: l.mask for n, l in layers.items()}
        assert all(bool((after[n] <= before[n]).all()) for n in layers)  # survivors only shrink
        if scope == "layer":
            for n in layers:
                assert int(after[n].sum()) == active[n] - round(0.2 * active[n])
        else:
            total = sum(active.values())
            assert sum(int(m.sum()) for m in after.values()) == total - round(0.2 * total)
            pruned = torch.cat([scores[n][before[n] & ~after[n]] for n in layers])
            kept = torch.cat([scores[n][after[n]] for n in layers])
            assert pruned.max() <= kept.min()  # the smallest pooled |w| go first, across layers
        ticket.rewind()
    assert [h["round"] for h in ticket.history] == [0, 1, 2, 3]
    assert ticket.history[0]["sparsity"] == 0.0
    assert ticket.history[-1]["sparsity"] == pytest.approx(1 - 0.8**3, abs=0.05)
    if block:
        assert ticket.manager.block_mask("blocks.0.mlp.fc1").shape == (8, 2)


def test_random_reinit_control_keeps_mask_changes_weights() -> None:
    model = tiny_vit()
    ticket = LotteryTicket(model, 0.5)
    _train(model, ticket, 2)
    ticket.prune()
    ticket.rewind()
    winning = {k: v.clone() for k, v in model.state_dict().items()}
    ticket.random_reinit(seed=1)
    for name, layer in ticket.manager.layers.items():
        w = layer.weight.detach()
        assert bool((w[~layer.element_mask] == 0).all())
        assert not torch.equal(w, winning[f"{name}.weight"])
        assert float(w[layer.element_mask].std()) == pytest.approx(float(ticket.rewind_state[f"{name}.weight"].std()), rel=0.3)
    assert torch.equal(model.state_dict()["head.weight"], winning["head.weight"])


def test_history_records_masks_and_metrics_and_ticket_file(tmp_path) -> None:
    model = tiny_vit()
    ticket = LotteryTicket(model, 0.3, scope="layer")
    ticket.record(acc=0.5)
    ticket.prune()
    ticket.record(acc=0.6)
    assert ticket.history[0]["metrics"] == {"acc": 0.5} and ticket.history[1]["metrics"] == {"acc": 0.6}
    assert all(bool(m.all()) for m in ticket.history[0]["masks"].values())
    assert not all(bool(m.all()) for m in ticket.history[1]["masks"].values())
    path = tmp_path / "ticket.safetensors"
    ticket.save(str(path))
    masks, meta = load_ticket(path)
    assert meta["round"] == "1" and meta["scope"] == "layer"
    fresh = LotteryTicket(tiny_vit(3), 0.3)
    fresh.load_masks(masks)
    assert all(torch.equal(fresh.manager.layers[n].mask, m) for n, m in masks.items())
    state = ticket.state_dict()
    other = LotteryTicket(tiny_vit(4), 0.3, scope="layer")
    other.load_state_dict(state)
    assert other.round == 1 and torch.equal(other.rewind_state["head.weight"], ticket.rewind_state["head.weight"])


def test_built_in_loop() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    model = tiny_vit()
    ticket = LotteryTicket(model, 0.5, rewind_step=1)

    def train(m, t):
        loss = fit(m, x, y, steps=3, batch_size=16, on_optimizer=t.attach, on_step=t.on_step)
        return {"loss": loss}

    history = ticket.run(train, rounds=2)
    assert len(history) == 3 and all("loss" in h["metrics"] for h in history)
    assert history[2]["sparsity"] == pytest.approx(0.75, abs=0.01)
    for layer in ticket.manager:
        assert bool((layer.weight[~layer.element_mask] == 0).all())


def test_bad_input() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"prune_fraction must lie in \(0, 1\)"):
        LotteryTicket(model, 1.0)
    with pytest.raises(TypeError, match="prune_fraction must be a float"):
        LotteryTicket(model, "0.2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope must be one of"):
        LotteryTicket(model, 0.2, scope="row")
    with pytest.raises(ValueError, match="block_size=64 must divide"):
        LotteryTicket(model, 0.2, granularity="block", block_size=64)
    with pytest.raises(ValueError, match="rounds must be an int"):
        LotteryTicket(model, 0.2).run(lambda m, t: {}, rounds=-1)
