"""The pieces of a timm ``VisionTransformer`` forward that token-sparse models reuse.

timm's ``forward_features`` runs embedding, blocks and norm in one go; DynamicViT and
patch tickets need to act between the blocks, so they call these steps themselves.
Only the plain ViT family is accepted (``VisionTransformer`` and its distilled
subclass), with token or average pooling.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

__all__ = ["check_vit", "embed_tokens", "head_from_tokens"]


def check_vit(model: object) -> VisionTransformer:
    """``model`` must be a timm VisionTransformer with 'token' or 'avg' pooling."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or subclass), got {type(model).__name__}")
    if model.global_pool not in ("token", "avg", ""):
        raise ValueError(f"model.global_pool must be 'token' or 'avg' for token dropping, got {model.global_pool!r}")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("attention-pooled ViTs (global_pool='map') are not supported")
    return model


def embed_tokens(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, prefix tokens, positional embedding, pre-norm: (B, P + N, C)."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def head_from_tokens(vit: VisionTransformer, x: torch.Tensor, patch_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from final tokens (after ``vit.norm``).

    With average pooling and a soft/hard ``patch_keep (B, N)`` mask, the average runs
    over the kept patch tokens only: ``Σ_i D̂_i x_i / max(Σ_i D̂_i, 1)``.  For hard
    decisions that keep at least one token this is the plain mean of the kept tokens;
    an image that keeps none (possible in training, where each stage samples its
    decisions) pools to 0 with a bounded gradient ``∂/∂D̂_j = x_j``, where a vanishing
    denominator would give gradients of order ``x_j / ε`` that swamp every other term.
    """
    if vit.global_pool == "avg" and patch_keep is not None:
        p = vit.num_prefix_tokens
        w = patch_keep.to(x.dtype).unsqueeze(-1)
        pooled = (x[:, p:] * w).sum(1) / w.sum(1).clamp_min(1.0)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))
    return vit.forward_head(x)
