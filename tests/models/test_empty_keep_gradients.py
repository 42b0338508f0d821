"""Training-time samples that keep no patch token must give bounded gradients.

In training each DynamicViT stage samples hard decisions, so an image can keep no
patch token at a late stage.  The kept-token averages (head pooling, the predictor's
global feature, the token-distillation MSE) then have a zero count; dividing by a
count clamped to a tiny ε gave gradients of order x/ε (≈1e11 on the digits suite),
which swamped every other loss term and kept the predictor from learning.
"""

from __future__ import annotations

import torch

from sparsevit.models import DynamicViT, DynamicViTLoss
from sparsevit.models.losses import kept_token_mse
from sparsevit.models.predictor import TokenPredictor
from sparsevit.models.vit_parts import head_from_tokens
from vit_factory import tiny_vit


def test_head_pooling_of_an_empty_keep_has_the_bounded_gradient() -> None:
    vit = tiny_vit(class_token=False, global_pool="avg")
    x = torch.randn(2, 16, 32)
    keep = torch.zeros(2, 16, requires_grad=True)
    logits = head_from_tokens(vit, x, keep)
    g = torch.randn_like(logits)
    (logits * g).sum().backward()
    # pooled = Σ D x / max(Σ D, 1) = 0 at D = 0, so ∂L/∂D_j = x_j · ∂L/∂pooled.
    pooled = torch.zeros(2, 32, requires_grad=True)
    (vit.head(vit.fc_norm(pooled)) * g).sum().backward()
    expected = (x * pooled.grad[:, None, :]).sum(-1)
    torch.testing.assert_close(keep.grad, expected)
    # With one kept token it is still the exact mean of the kept tokens.
    one = torch.zeros(2, 16)
    one[:, 3] = 1
    torch.testing.assert_close(head_from_tokens(vit, x, one), vit.head(vit.fc_norm(x[:, 3])))


def test_predictor_global_feature_of_an_empty_keep_is_bounded() -> None:
    torch.manual_seed(0)
    pred = TokenPredictor(32)
    x = torch.randn(2, 16, 32)
    keep = torch.zeros(2, 16, 1, requires_grad=True)
    pred(x, keep)[..., 0].sum().backward()
    assert torch.isfinite(keep.grad).all()
    assert float(keep.grad.abs().max()) < 1e3


def test_kept_token_mse_of_an_empty_keep_is_zero_with_bounded_gradient() -> None:
    s = torch.randn(2, 17, 8, requires_grad=True)
    t = torch.randn(2, 17, 8)
    keep = torch.zeros(2, 16, requires_grad=True)
    loss = kept_token_mse(s, t, keep, num_prefix=1)
    loss.backward()
    assert float(loss) == 0.0
    expected = ((s.detach()[:, 1:] - t[:, 1:]) ** 2).sum(-1) / 8  # ∂/∂D_bi at Σ D = 0 (count floored at 1)
    torch.testing.assert_close(keep.grad, expected)


def test_training_step_with_an_emptied_last_stage_has_moderate_predictor_gradients() -> None:
    torch.manual_seed(0)
    model = DynamicViT(tiny_vit(class_token=False, global_pool="avg"), keep_ratio=0.5, prune_at=[1, 2, 3]).train()
    with torch.no_grad():  # the last predictor drops (almost) everything
        model.score_predictor[-1].out_conv[4].bias.copy_(torch.tensor([-20.0, 20.0]))
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    out = model(images)
    assert float(out.decisions[-1].sum(1).min()) == 0.0  # the regime under test occurs
    DynamicViTLoss()(out, labels).backward()
    norms = [float(p.grad.norm()) for p in model.score_predictor.parameters() if p.grad is not None]
    assert norms and all(torch.isfinite(torch.tensor(norms)))
    assert max(norms) < 1e4, norms
