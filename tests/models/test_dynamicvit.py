"""DynamicViT on timm ViTs: ρ = 1 parity, exact kept counts, hierarchical masks, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from sparsevit.models import DynamicViT, DynamicViTLoss, dynamic_vit
from vit_factory import VARIANTS, tiny_vit


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keep_all_equals_dense(variant: str) -> None:
    vit = tiny_vit(**VARIANTS[variant])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = vit(images)
        model = DynamicViT(vit, keep_ratio=1.0, prune_at=[1, 2]).eval()
        logits = model(images)
    torch.testing.assert_close(logits, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inference_kept_counts_and_hierarchy(variant: str) -> None:
    vit = tiny_vit(**VARIANTS[variant])
    model = DynamicViT(vit, keep_ratio=0.7, prune_at=[1, 2, 3]).eval()
    p = vit.num_prefix_tokens
    with torch.no_grad():
        logits, kept = model(torch.randn(2, 3, 32, 32), return_index=True)
    assert logits.shape == (2, 5)
    previous = None
    for s, index in enumerate(kept):
        assert index.shape == (2, p + math.ceil(0.7 ** (s + 1) * 16))
        assert torch.equal(index[:, :p], torch.arange(p).expand(2, p))  # prefix always kept
        if previous is not None:  # a dropped token never returns
            for b in range(2):
                assert set(index[b].tolist()) <= set(previous[b].tolist())
        previous = index


def test_training_forward_masks_and_gradients() -> None:
    torch.manual_seed(0)
    vit = tiny_vit()
    model = DynamicViT(vit, keep_ratio=0.5, prune_at=[1, 3]).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    out = model(images)
    assert len(out.decisions) == 2 and out.keep_ratios == [0.5, 0.25]
    first, second = out.decisions
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert (second <= first).all()  # hierarchical
    with torch.no_grad():
        teacher = tiny_vit()(images)
    loss = DynamicViTLoss()(out, labels, teacher_logits=teacher, teacher_tokens=out.tokens.detach() + 0.1)
    loss.backward()
    for predictor in model.score_predictor:
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert all(blk.attn.keep is None for blk in model.vit.blocks)  # masks cleared after the forward


def test_load_dense_weights_and_builder() -> None:
    dense = tiny_vit()
    model = dynamic_vit(tiny_vit(), keep_ratio=1.0, prune_at=[2])
    model.load_dense(dense.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), dense(images), atol=1e-5, rtol=1e-5)
    names = [n for n, _ in model.named_parameters() if n.startswith("score_predictor.0.")]
    assert "score_predictor.0.in_conv.1.weight" in names and "score_predictor.0.out_conv.4.weight" in names


def test_default_prune_locations() -> None:
    model = DynamicViT(tiny_vit(depth=12), 0.7)
    assert model.prune_at == [3, 6, 9]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="keep_ratio must be"):
        DynamicViT(tiny_vit(), keep_ratio=0.0)
    with pytest.raises(ValueError, match="keep_ratio must be"):
        DynamicViT(tiny_vit(), keep_ratio=1.5)
    with pytest.raises(ValueError, match="prune_at must be"):
        DynamicViT(tiny_vit(), prune_at=[0, 2])
    with pytest.raises(ValueError, match="prune_at must be"):
        DynamicViT(tiny_vit(), prune_at=[2, 4])
    with pytest.raises(ValueError, match="prune_at must be"):
        DynamicViT(tiny_vit(), prune_at=[2, 1])
    with pytest.raises(TypeError, match="must be a timm VisionTransformer"):
        DynamicViT(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="only used with a model name"):
        dynamic_vit(tiny_vit(), pretrained=True)
