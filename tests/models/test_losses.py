"""DynamicViT loss terms against hand-computed values; distillation modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsevit.models import DistillationLoss, DynamicViTLoss, DynamicViTOutput, ensemble_logits
from sparsevit.models.losses import kept_token_mse, ratio_loss, soft_kl


def test_ratio_loss_by_hand() -> None:
    d1 = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    d2 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    expected = (((0.75 - 0.7) ** 2 + (0.25 - 0.7) ** 2) / 2) + (((0.25 - 0.49) ** 2 + (0.0 - 0.49) ** 2) / 2)
    assert ratio_loss([d1, d2], [0.7, 0.49]).item() == pytest.approx(expected)
    assert ratio_loss([d1, d2], [0.7, 0.49], average_stages=True).item() == pytest.approx(expected / 2)


def test_kept_token_mse_only_counts_kept() -> None:
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[9.0, 9.0], [1.0, 3.0], [100.0, 100.0]]])
    keep = torch.tensor([[1.0, 0.0]])  # patch 0 kept, patch 1 dropped; token 0 is the prefix
    assert kept_token_mse(s, t, keep, 1).item() == pytest.approx((1 + 9) / 2)


def test_soft_kl_matches_definition() -> None:
    y, t = torch.randn(4, 6), torch.randn(4, 6)
    p_t = F.softmax(t / 2, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(y / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(soft_kl(y, t, 2.0), expected)


def test_dynamicvit_loss_combines_terms() -> None:
    logits = torch.randn(2, 5, requires_grad=True)
    tokens = torch.randn(2, 4, 3, requires_grad=True)
    decisions = [torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])]
    out = DynamicViTOutput(logits, tokens, decisions, [0.7], 1)
    labels, teacher, teacher_tokens = torch.tensor([1, 3]), torch.randn(2, 5), torch.randn(2, 4, 3)
    loss = DynamicViTLoss()(out, labels, teacher, teacher_tokens)
    expected = (F.cross_entropy(logits, labels) + 2.0 * ratio_loss(decisions, [0.7])
                + 0.5 * soft_kl(logits, teacher) + 0.5 * kept_token_mse(tokens, teacher_tokens, decisions[0], 1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None and tokens.grad is not None
    with pytest.raises(TypeError, match="DynamicViTOutput"):
        DynamicViTLoss()(logits, labels)
    with pytest.raises(ValueError, match="ratio_weight"):
        DynamicViTLoss(ratio_weight=-1)


def test_distillation_modes_and_ensemble() -> None:
    y, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    teacher = torch.randn(3, 4)
    ce = F.cross_entropy(y, labels)
    torch.testing.assert_close(DistillationLoss("none")(y, labels), ce)
    torch.testing.assert_close(DistillationLoss("soft", 0.25, 2.0)(y, labels, teacher), 0.75 * ce + 0.25 * soft_kl(y, teacher, 2.0))
    torch.testing.assert_close(DistillationLoss("hard", 0.5)(y, labels, teacher), 0.5 * ce + 0.5 * F.cross_entropy(y, teacher.argmax(-1)))
    y2 = torch.randn(3, 4)
    torch.testing.assert_close(DistillationLoss("hard", 0.5)((y, y2), labels, teacher), 0.5 * ce + 0.5 * F.cross_entropy(y2, teacher.argmax(-1)))
    with pytest.raises(ValueError, match="teacher_logits are required"):
        DistillationLoss("soft")(y, labels)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    torch.testing.assert_close(ensemble_logits([a, b], x), (a(x) + b(x)).detach() / 2)
