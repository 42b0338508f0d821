"""Tiny timm ViTs with random weights for model tests (no downloads)."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer

VARIANTS = {
    "cls": dict(),
    "avg_no_cls": dict(class_token=False, global_pool="avg"),
    "registers": dict(reg_tokens=2),
    "layerscale_qknorm": dict(init_values=1e-2, qk_norm=True, no_embed_class=True),
}


def tiny_vit(depth: int = 4, img_size: int = 32, patch_size: int = 8, **kwargs) -> VisionTransformer:
    """A 4-block ViT (embed 32, 2 heads) on 32×32 images: 16 patch tokens."""
    cfg = dict(img_size=img_size, patch_size=patch_size, embed_dim=32, depth=depth, num_heads=2, num_classes=5)
    cfg.update(kwargs)
    return VisionTransformer(**cfg).eval()
