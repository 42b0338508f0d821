"""Universal tickets: a frozen ticket (supermask or MaskManager/IMP) with new linear heads, y_t = A_t·φ(x) + b_t.

Training a head must leave every backbone parameter, buffer, score and mask bit-identical,
give the backbone no gradient, change the head and lower the loss; tasks keep separate heads.
"""

from __future__ import annotations

import pytest
import torch
from st_helpers import tiny_vit
from torch import nn

from sparsevit.sparse_training import (
    LotteryTicket,
    UniversalTicket,
    attach_task_head,
    convert_to_supermask,
    fit,
    freeze_ticket,
    supermask_layers,
    ticket_sparsity,
)


def _data(n: int = 48, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g)


def _supermask_ticket() -> tuple[nn.Module, object]:
    model = convert_to_supermask(tiny_vit(), 0.5, seed=1)
    return model, None


def _imp_ticket() -> tuple[nn.Module, object]:
    model = tiny_vit()
    ticket = LotteryTicket(model, 0.5, scope="global")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ticket.attach(opt)  # a live optimizer hook of the source training must not matter
    ticket.prune()
    return model, ticket


def _masks(model: nn.Module, ticket: object) -> dict[str, torch.Tensor]:
    if ticket is None:
        return {n: l.unit_mask().clone() for n, l in supermask_layers(model).items()}
    return {n: m.clone() for n, m in ticket.masks().items()}


def _teacher_labels(model: nn.Module, x: torch.Tensor, classes: int = 3) -> torch.Tensor:
    """Labels a linear head can learn: argmax of a fixed random linear map of the class-token features."""
    with torch.no_grad():
        phi = model.forward_features(x)[:, 0]
        teacher = torch.randn(phi.shape[1], classes, generator=torch.Generator().manual_seed(11))
        # an untrained ViT's class token varies little between images: rank its standardised deviations
        z = (phi - phi.mean(0)) / (phi.std(0) + 1e-12)
        return (z @ teacher).argmax(-1)


def _full_batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("kind", ["supermask", "imp"])
def test_head_training_leaves_ticket_bit_identical(kind: str) -> None:
    model, ticket = _supermask_ticket() if kind == "supermask" else _imp_ticket()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks_before = _masks(model, ticket)
    universal = (UniversalTicket(model, 3) if ticket is None else UniversalTicket.from_mask_manager(ticket, 3))
    head_before = {k: v.clone() for k, v in universal.head().state_dict().items()}
    x, _ = _data()
    y = _teacher_labels(model, x)
    assert len(set(y.tolist())) > 1
    loss0 = _full_batch_loss(universal, x, y)
    fit(universal, x, y, steps=60, lr=3e-2, batch_size=16)
    loss1 = _full_batch_loss(universal, x, y)

    after = universal.state_dict()
    backbone_keys = [k for k in after if not k.startswith("heads.")]
    assert sorted(backbone_keys) == sorted(f"backbone.{k}" for k in before)
    for key, value in before.items():
        assert torch.equal(after[f"backbone.{key}"], value), key
    for name, mask in _masks(model, ticket).items():
        assert torch.equal(mask, masks_before[name]), name
    if ticket is not None:  # the pruned weights are still exact zeros
        for name, layer in ticket.manager.layers.items():
            assert bool((layer.weight[~layer.element_mask] == 0).all()), name
    assert not torch.equal(universal.head().weight, head_before["weight"])
    assert not torch.equal(universal.head().bias, head_before["bias"])
    assert loss1 < 0.8 * loss0, (loss0, loss1)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m.training for m in model.modules()) and universal.training


def test_backbone_gets_no_gradient_head_does() -> None:
    model, _ = _supermask_ticket()
    universal = attach_task_head(model, 4)
    x, _ = _data(n=6)
    universal(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert universal.head().weight.grad is not None and universal.head().bias.grad is not None
    assert [id(p) for p in universal.parameters() if p.requires_grad] == [id(p) for p in universal.head().parameters()]


def test_forward_is_linear_head_on_class_token_features() -> None:
    model = tiny_vit(seed=3)
    universal = UniversalTicket(model, 5)
    x, _ = _data(n=4)
    with torch.no_grad():
        phi = model.forward_features(x)[:, 0]  # timm's token pooling: the normed class token
        a, b = universal.head().weight, universal.head().bias
        expected = phi @ a.T + b
        torch.testing.assert_close(universal(x), expected, rtol=1e-5, atol=1e-6)
        model.head.weight.add_(1.0)  # the old head is not used
        torch.testing.assert_close(universal(x), expected, rtol=1e-5, atol=1e-6)
    assert universal(x).shape == (4, 5)


def test_custom_feature_fn_keeps_batchnorm_in_eval() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    backbone.train()
    with torch.no_grad():  # non-trivial running statistics, so eval mode differs from batch statistics
        backbone[1].running_mean.uniform_(-1, 1)
        backbone[1].running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    universal = UniversalTicket(backbone, 2, feature_fn=lambda m, x: m[:3](x), feature_dim=8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    y = (x[:, 0] > 0).long()
    fit(universal, x, y, steps=30, lr=1e-2, batch_size=16)
    for key, value in before.items():
        assert torch.equal(backbone.state_dict()[key], value), key
    bn, lin = backbone[1], backbone[0]
    with torch.no_grad():
        z = x[:5] @ lin.weight.T + lin.bias
        z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        expected = z.clamp_min(0) @ universal.head().weight.T + universal.head().bias
        torch.testing.assert_close(universal(x[:5]), expected, rtol=1e-5, atol=1e-5)


def test_two_tasks_keep_separate_heads() -> None:
    model, _ = _supermask_ticket()
    universal = UniversalTicket(model)
    universal.add_task("parity", 2)
    universal.add_task("coarse", 3)
    assert universal.tasks == ["parity", "coarse"] and universal.active_task == "parity"
    x, y3 = _data(classes=3, seed=4)
    y2 = y3 % 2
    snapshot = {k: v.clone() for k, v in universal.state_dict().items()}
    fit(universal.select_task("coarse"), x, y3, steps=20, lr=1e-2, batch_size=16)
    now = universal.state_dict()
    assert torch.equal(now["heads.parity.weight"], snapshot["heads.parity.weight"])
    assert not torch.equal(now["heads.coarse.weight"], snapshot["heads.coarse.weight"])
    coarse_trained = now["heads.coarse.weight"].clone()
    fit(universal.select_task("parity"), x, y2, steps=20, lr=1e-2, batch_size=16)
    now = universal.state_dict()
    assert torch.equal(now["heads.coarse.weight"], coarse_trained)
    assert not torch.equal(now["heads.parity.weight"], snapshot["heads.parity.weight"])
    assert universal(x[:3], task="coarse").shape == (3, 3) and universal(x[:3]).shape == (3, 2)
    with torch.no_grad():
        phi = universal.features(x[:3])
        torch.testing.assert_close(universal(x[:3], task="coarse"),
                                   phi @ universal.heads["coarse"].weight.T + universal.heads["coarse"].bias)
    assert universal.heads["parity"].weight.requires_grad and not universal.heads["coarse"].weight.requires_grad


def test_heads_are_seeded_and_leave_global_rng_alone() -> None:
    a = UniversalTicket(tiny_vit(), 3, seed=7)
    state = torch.get_rng_state()
    b = UniversalTicket(tiny_vit(), 3, seed=7)
    torch.manual_seed(0)
    first = torch.rand(3)
    torch.set_rng_state(state)
    UniversalTicket(nn.Linear(2, 2), 3, feature_fn=lambda m, x: x, feature_dim=2, seed=7)
    assert torch.equal(a.head().weight, b.head().weight)
    bound = 1.0 / 32 ** 0.5
    assert float(a.head().weight.detach().abs().max()) <= bound and a.head().weight.shape == (3, 32)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), first)
    assert not torch.equal(UniversalTicket(tiny_vit(), 3, seed=8).head().weight, a.head().weight)


def test_ticket_sparsity_by_hand() -> None:
    model, _ = _supermask_ticket()
    layers = supermask_layers(model)
    kept = sum(l.k * l.inner.weight.numel() // l.scores.numel() for l in layers.values())
    total = sum(l.inner.weight.numel() for l in layers.values())
    assert ticket_sparsity(model) == pytest.approx(1 - kept / total)
    model, ticket = _imp_ticket()
    weights = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert ticket_sparsity(model) == pytest.approx(zeros / sum(w.numel() for w in weights))
    assert zeros >= sum((~l.element_mask).sum().item() for l in ticket.manager.layers.values()) > 0


def test_freeze_ticket() -> None:
    model = tiny_vit()
    assert freeze_ticket(model) is model
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("num_classes,error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                                               ("3", TypeError)])
def test_bad_num_classes(num_classes, error) -> None:
    with pytest.raises(error, match="num_classes"):
        UniversalTicket(tiny_vit(), num_classes)
    universal = UniversalTicket(tiny_vit())
    with pytest.raises(error, match="num_classes"):
        universal.add_task("t", num_classes)


def test_bad_input_errors() -> None:
    with pytest.raises(TypeError, match="backbone"):
        UniversalTicket({"weight": torch.zeros(2, 2)}, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        attach_task_head("vit", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="feature_fn"):
        UniversalTicket(nn.Linear(4, 4), 3, feature_dim=4)
    with pytest.raises(TypeError, match="feature_fn"):
        UniversalTicket(tiny_vit(), 3, feature_fn="forward_features")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature_dim"):
        UniversalTicket(nn.Linear(4, 4), 3, feature_fn=lambda m, x: m(x))
    with pytest.raises(ValueError, match="feature_dim"):
        UniversalTicket(nn.Linear(4, 4), 3, feature_fn=lambda m, x: m(x), feature_dim=0)
    with pytest.raises(TypeError, match="ticket"):
        UniversalTicket.from_mask_manager(tiny_vit(), 3)
    universal = UniversalTicket(tiny_vit(), 3, task="digits")
    x, _ = _data(n=2)
    with pytest.raises(ValueError, match="'parity'.*digits"):
        universal(x, task="parity")
    with pytest.raises(ValueError, match="task"):
        universal.select_task("parity")
    with pytest.raises(TypeError, match="task"):
        universal(x, task=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already"):
        universal.add_task("digits", 2)
    with pytest.raises(ValueError, match="name"):
        universal.add_task("a.b", 2)
    with pytest.raises(ValueError, match="task must be given"):
        UniversalTicket(tiny_vit())(x)
    wrong = UniversalTicket(nn.Linear(4, 4), 2, feature_fn=lambda m, x: m(x), feature_dim=5)
    with pytest.raises(ValueError, match="feature_fn must return"):
        wrong(torch.zeros(2, 4))
