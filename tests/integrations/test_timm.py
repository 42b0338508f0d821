"""patch_attention on timm models: what is swapped, output parity, and learning a keep mask."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from sparsevit.integrations import patch_attention
from sparsevit.nn import MaskedAttention
from helpers import backend_params, require_backend
from masked_helpers import dynamicvit_attention

SMALL = dict(embed_dim=48, depth=2, num_heads=3, num_classes=7)

# The ViT family as timm builds it, small and with random weights.
VIT_CONFIGS = {
    "cls_token": dict(img_size=32, patch_size=8),
    "no_cls_gap": dict(img_size=32, patch_size=8, class_token=False, global_pool="avg"),
    "reg_tokens": dict(img_size=32, patch_size=8, reg_tokens=4, no_embed_class=True),
    "reg_tokens_gap": dict(img_size=32, patch_size=8, reg_tokens=2, class_token=False, global_pool="avg"),
    "qk_norm": dict(img_size=32, patch_size=8, qk_norm=True),
    "layerscale_deit3": dict(img_size=32, patch_size=8, init_values=1e-2, no_embed_class=True),
    "patch4_rect": dict(img_size=(16, 28), patch_size=4),
    "patch16_img48": dict(img_size=48, patch_size=16, embed_dim=64, num_heads=4),
    "pre_norm_clip": dict(img_size=32, patch_size=8, pre_norm=True, class_token=True),
    "no_bias": dict(img_size=32, patch_size=8, qkv_bias=False, proj_bias=False),
    "scale_attn_norm": dict(img_size=32, patch_size=8, scale_attn_norm=True),
    "fc_norm_avg": dict(img_size=32, patch_size=8, global_pool="avg", fc_norm=True),
    "map_pool": dict(img_size=32, patch_size=8, global_pool="map"),
    "deep_wide": dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2),
}


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    cfg = {**SMALL, **VIT_CONFIGS[name]}
    torch.manual_seed(0)
    model = VisionTransformer(**cfg).eval()
    size = cfg["img_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return model, torch.randn(2, 3, h, w)


def _num_tokens(model: torch.nn.Module, x: torch.Tensor) -> int:
    return model.patch_embed(x).reshape(x.shape[0], -1, model.embed_dim).shape[1] + model.num_prefix_tokens


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
def test_vit_parity(name: str) -> None:
    model, x = _build(name)
    original = copy.deepcopy(model)
    expected = original(x)
    patch_attention(model)
    report = model.sparsevit_patch_report
    assert len(report.swapped) == model.blocks.__len__()
    assert all(isinstance(b.attn, MaskedAttention) for b in model.blocks)
    with torch.no_grad():
        assert (model(x) - expected).abs().max().item() <= 1e-5
        # all-ones mask with eps = 0 is exact softmax attention through the masked path
        n = _num_tokens(model, x)
        for block in model.blocks:
            block.attn.keep = torch.ones(2, n)
            block.attn.eps = 0.0
        assert (model(x) - expected).abs().max().item() <= 1e-5
    # the dense checkpoint loads strictly into a model built with the layer injected
    cfg = {**SMALL, **VIT_CONFIGS[name]}
    injected = VisionTransformer(**cfg, attn_layer=MaskedAttention).eval()
    injected.load_state_dict(original.state_dict(), strict=True)
    with torch.no_grad():
        assert (injected(x) - expected).abs().max().item() <= 1e-5


def test_map_pool_attention_is_reported_not_swapped() -> None:
    model, _ = _build("map_pool")
    patch_attention(model)
    skipped = dict(model.sparsevit_patch_report.skipped)
    assert any("AttentionPoolLatent" in reason for reason in skipped.values()), skipped
    assert "blocks.0.attn" in model.sparsevit_patch_report.swapped


def test_distilled_deit_parity() -> None:
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    patch_attention(model)
    assert len(model.sparsevit_patch_report.swapped) == 2 and model.num_prefix_tokens == 2
    assert (model(x) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", dict(img_size=32)),
        ("deit_tiny_distilled_patch16_224", dict(img_size=32)),
        ("deit3_small_patch16_224", dict(img_size=32, embed_dim=48, num_heads=3)),
        ("vit_base_patch16_reg4_gap_256", dict(img_size=32, embed_dim=48, num_heads=3)),
    ],
)
def test_create_model_with_attn_layer(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    dense = timm.create_model(name, pretrained=False, depth=2, **kwargs).eval()
    masked = timm.create_model(name, pretrained=False, depth=2, attn_layer=MaskedAttention, **kwargs).eval()
    assert all(isinstance(b.attn, MaskedAttention) for b in masked.blocks)
    masked.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert (masked(x) - dense(x)).abs().max().item() <= 1e-5


def test_unsupported_attention_left_alone_with_reason() -> None:
    """Rotary (EVA-02) attention is not swapped, and the report says why."""
    model = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1, embed_dim=48, num_heads=3
    ).eval()
    x = torch.randn(1, 3, 28, 28)
    expected = model(x)
    patch_attention(model)
    report = model.sparsevit_patch_report
    assert report.swapped == []
    assert report.skipped and all("not supported" in reason for _, reason in report.skipped)
    assert "blocks.0.attn" in dict(report.skipped)
    assert torch.equal(model(x), expected)
    assert "left" in str(report)


def test_patch_is_idempotent() -> None:
    model, x = _build("cls_token")
    patch_attention(model)
    patch_attention(model)
    report = model.sparsevit_patch_report
    assert report.swapped == [] and all(r == "already MaskedAttention" for _, r in report.skipped)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_attention("vit")


def _dynamicvit_logits(model, x, keep, eps):
    """The same model with DynamicViT's published unfused attention (gradient through the max)."""
    def attn_forward(module, t, attn_mask=None, is_causal=False):
        b, n, _ = t.shape
        qkv = module.qkv(t).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        out = dynamicvit_attention(q, k, v, keep, module.scale, eps)
        return module.proj(out.transpose(1, 2).reshape(b, n, module.attn_dim))

    originals = [blk.attn.forward for blk in model.blocks]
    try:
        for blk in model.blocks:
            blk.attn.forward = attn_forward.__get__(blk.attn)
        return model(x)
    finally:
        for blk, fwd in zip(model.blocks, originals):
            blk.attn.forward = fwd


@pytest.mark.parametrize("backend", backend_params())
def test_training_learns_keep_mask(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few optimiser steps on a ViT with a learnable keep mask: non-zero, correct gradients."""
    require_backend(backend)
    monkeypatch.setenv("SPARSEVIT_BACKEND", backend)
    dev = torch.device("cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu")
    model, x = _build("qk_norm")
    model, x = model.to(dev), x.to(dev)
    patch_attention(model)
    model.train()
    n = _num_tokens(model, x)
    logits_param = torch.zeros(2, n, device=dev, requires_grad=True)
    target = torch.tensor([1, 4], device=dev)
    opt = torch.optim.SGD([logits_param, *model.parameters()], lr=0.5)
    eps = 1e-6
    for _ in range(3):
        keep = torch.sigmoid(logits_param)
        for blk in model.blocks:
            blk.attn.keep = keep
        loss = torch.nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        grad = logits_param.grad.clone()
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        # the same step through DynamicViT's own formula gives the same mask gradient
        for blk in model.blocks:
            blk.attn.keep = None
        ref_param = logits_param.detach().clone().requires_grad_()
        ref_loss = torch.nn.functional.cross_entropy(_dynamicvit_logits(model, x, torch.sigmoid(ref_param), eps), target)
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_param)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-3)
        opt.step()
    assert not torch.equal(logits_param.detach(), torch.zeros_like(logits_param))
