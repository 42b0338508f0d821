"""Self-describing tickets: save_ticket(path, manager) and apply_ticket / load_ticket(model, path)."""

from __future__ import annotations

import json

import pytest
import torch

from sparsevit.sparse_training import LotteryTicket, MaskManager, RigL, apply_ticket, load_ticket, save_ticket
from st_helpers import tiny_vit, train_step


@pytest.mark.parametrize("granularity,block", [("element", None), ("block", 16)])
def test_a_rigl_ticket_applies_to_a_fresh_model(tmp_path, granularity: str, block) -> None:
    model = tiny_vit(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rigl = RigL(model, opt, 0.8, delta_t=2, t_end=4, granularity=granularity, block_size=block, distribution="erk")
    for step in range(4):
        train_step(model, opt, step)
        rigl.step()
    path = tmp_path / "t.safetensors"
    save_ticket(path, rigl, {"note": "digits run"})
    masks, meta = load_ticket(path)
    assert meta["note"] == "digits run" and meta["sparsevit.method"] == "RigL"
    assert meta["sparsevit.granularity"] == granularity
    assert meta["sparsevit.block_size"] == ("none" if block is None else str(block))
    assert float(meta["sparsevit.sparsity"]) == pytest.approx(rigl.manager.total_sparsity())
    layers = json.loads(meta["sparsevit.layers"])
    assert set(layers) == set(rigl.manager.layers)

    fresh = tiny_vit(1)
    manager = load_ticket(fresh, path)  # == apply_ticket(fresh, path)
    assert isinstance(manager, MaskManager) and manager.granularity == granularity and manager.block_size == block
    for name, layer in rigl.manager.layers.items():
        assert torch.equal(manager.layers[name].mask, layer.mask.cpu())
        w = fresh.get_submodule(name).weight
        assert bool((w.detach()[~manager.layers[name].element_mask] == 0).all())  # W ← W ⊙ M
    assert manager.total_sparsity() == pytest.approx(rigl.manager.total_sparsity())


def test_a_lottery_ticket_and_an_optimizer(tmp_path) -> None:
    model = tiny_vit(0)
    ticket = LotteryTicket(model, prune_fraction=0.5, granularity="block", block_size=16)
    ticket.prune()
    path = tmp_path / "lt.safetensors"
    save_ticket(path, ticket)
    fresh = tiny_vit(2)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.5)
    manager = apply_ticket(fresh, path, optimizer=opt)
    assert manager.optimizer is opt
    train_step(fresh, opt, 0)  # the masks are re-applied after the step
    for name, layer in manager.layers.items():
        assert bool((fresh.get_submodule(name).weight.detach()[~layer.element_mask] == 0).all())


def test_mismatches_are_refused_before_anything_changes(tmp_path) -> None:
    model = tiny_vit(0)
    manager = MaskManager(model, 0.5, granularity="block", block_size=16, distribution="uniform")
    path = tmp_path / "t.safetensors"
    save_ticket(path, manager)
    from timm.models.vision_transformer import VisionTransformer

    other = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2, num_classes=5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this model \(layers missing from the model: \['blocks.1"):
        apply_ticket(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(TypeError, match="model must be"):
        apply_ticket("vit", path)
    with pytest.raises(TypeError, match="takes only the path"):
        load_ticket(path, "extra")


def test_a_bare_mapping_ticket_is_not_applied(tmp_path) -> None:
    model = tiny_vit(0)
    manager = MaskManager(model, 0.5, granularity="element", distribution="uniform")
    path = tmp_path / "bare.safetensors"
    save_ticket(path, manager.masks())
    with pytest.raises(ValueError, match="does not describe its masks"):
        apply_ticket(tiny_vit(1), path)
    with pytest.raises(ValueError, match="reserved"):
        save_ticket(tmp_path / "x.safetensors", manager, {"sparsevit.method": "mine"})
