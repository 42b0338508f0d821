"""The bounded keep-mask gradient of DynamicViT training and the detached predictor input.

The exact gradient of the masked softmax at a dropped key is ``e_ij / (S_i + ε)``, which explodes
when that key would dominate its row; ``keep_grad_clip`` clamps what reaches D̂ from attention
(forward unchanged), ``detach_predictor_input`` cuts the path through the predictors' inputs."""

from __future__ import annotations

import pytest
import torch

from sparsevit import masked_softmax
from sparsevit.models import DynamicViT
from sparsevit.models.keep_grad import clip_keep_grad
from sparsevit.models.losses import ratio_loss
from vit_factory import tiny_vit


def test_clip_keep_grad_is_identity_forward_and_clamps_backward() -> None:
    x = torch.tensor([0.0, 1.0, 1.0], requires_grad=True)
    y = clip_keep_grad(x, 0.5)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([3.0, -0.2, -7.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.5, -0.2, -0.5]))
    for bad in (0.0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="bound"):
            clip_keep_grad(x, bad)  # type: ignore[arg-type]


def test_the_exact_keep_gradient_explodes_at_a_dominant_dropped_key() -> None:
    # Row 0: key 1 dropped and 10 nats above the others: ∂Ã_01/∂G_1 ≈ e_01/(S_0 + ε) ≈ e^{10}/2.
    scores = torch.tensor([[[[0.0, 10.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])
    keep = torch.tensor([[1.0, 0.0, 1.0]], requires_grad=True)
    a = masked_softmax(scores, keep)
    a[0, 0, 0, 1].backward()
    assert float(keep.grad[0, 1]) > 1e4
    assert float(a[0, 0, 0, 1]) < 1e-2  # while keeping the token could move Ã_01 by at most 1


def _model(**kw) -> DynamicViT:
    torch.manual_seed(0)
    return DynamicViT(tiny_vit(), keep_ratio=0.5, prune_at=[1, 2, 3], **kw).train()


def test_clipped_training_forward_is_unchanged_and_bounds_the_predictor_gradient() -> None:
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    exact, clipped = _model(), _model(keep_grad_clip=1e-3)
    torch.manual_seed(1)
    out_exact = exact(images)
    torch.manual_seed(1)
    out_clip = clipped(images)
    torch.testing.assert_close(out_clip.logits, out_exact.logits)
    for a, b in zip(out_exact.decisions, out_clip.decisions):
        assert torch.equal(a, b)
    norms = []
    for model, out in ((exact, out_exact), (clipped, out_clip)):
        torch.nn.functional.cross_entropy(out.logits, labels).backward()
        norms.append(sum(float(p.grad.norm()) for p in model.score_predictor.parameters() if p.grad is not None))
    assert 0 < norms[1] < norms[0]
    assert all(blk.attn.keep is None for blk in clipped.vit.blocks)


def test_detached_predictor_input_sends_no_predictor_loss_to_the_backbone() -> None:
    # The ratio loss depends on the decisions only: with detached inputs it reaches the predictors
    # and nothing else; without, it also trains the backbone through the predictors' inputs.
    images = torch.randn(4, 3, 32, 32)
    for detach in (True, False):
        model = _model(detach_predictor_input=detach)
        out = model(images)
        ratio_loss(out.decisions, out.keep_ratios).backward()
        got = model.vit.patch_embed.proj.weight.grad
        reached = got is not None and float(got.abs().sum()) > 0
        assert reached is (not detach)
        assert all(p.grad is not None for p in model.score_predictor[0].parameters())


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="keep_grad_clip"):
        DynamicViT(tiny_vit(), keep_grad_clip=0.0)
    with pytest.raises(ValueError, match="keep_grad_clip"):
        DynamicViT(tiny_vit(), keep_grad_clip=float("inf"))
    with pytest.raises(TypeError, match="detach_predictor_input"):
        DynamicViT(tiny_vit(), detach_predictor_input=1)  # type: ignore[arg-type]
