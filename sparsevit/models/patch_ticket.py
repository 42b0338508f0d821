"""Data-level lottery tickets for ViTs (Shen et al., IJCAI 2023): train on a subset of patches.

* :class:`TicketSelector` scores every patch of an image by the class token's attention
  averaged over heads, ``a_j = mean_h Ã[h, 0, P + j]``, at one or more depths of a
  trained ViT (averaged over the depths), and keeps the top-k patches per image (k, or
  a ratio ⌈r·N⌉). Read through :class:`sparsevit.nn.MaskedAttention`'s class-token row.
* :class:`RandomPatchSelector`: the control, k patches uniformly at random per image.
* :class:`PatchTicketViT` runs a timm ViT on the selected patches only: the patch and
  positional embeddings are computed as usual and the prefix tokens plus the selected
  patches gathered (:func:`sparsevit.gather_tokens`), so the blocks see only them.
  ``forward(images, patch_index)`` with ``patch_index (B, k)`` in ``[0, N)``;
  ``patch_index=None`` is the "dense" evaluation mode (every patch).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from ..integrations.timm import patch_attention
from ..nn.masked_attention import MaskedAttention
from ..ops import gather_tokens
from ..rounding import ceil_fraction
from .vit_parts import check_vit, embed_tokens, head_from_tokens

__all__ = ["TicketSelector", "RandomPatchSelector", "PatchTicketViT", "patch_count"]


def patch_count(keep: Union[int, float], num_patches: int) -> int:
    """k from an int count in [1, N] or a ratio in (0, 1] (⌈r·N⌉)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int count or a float ratio, got {type(keep).__name__}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep as a ratio must lie in (0, 1], got {keep}")
        return max(1, ceil_fraction(keep, num_patches))
    if not 1 <= keep <= num_patches:
        raise ValueError(f"keep must lie in [1, {num_patches}] patches, got {keep}")
    return keep


def _with_prefix(patch_index: torch.Tensor, num_prefix: int) -> torch.Tensor:
    b = patch_index.shape[0]
    prefix = torch.arange(num_prefix, device=patch_index.device).expand(b, num_prefix)
    return torch.cat([prefix, patch_index + num_prefix], dim=1)


class TicketSelector(nn.Module):
    """Picks each image's winning-ticket patches from a trained ViT's class-token attention.

    Args:
        vit: a trained timm VisionTransformer with a class token; its attention is
            swapped in place for :class:`MaskedAttention` (outputs unchanged).
        depths: 0-indexed blocks whose class-token attention scores the patches.
        keep: patches kept per image (count or ratio).
    """

    def __init__(self, vit: VisionTransformer, depths: Sequence[int] = (-1,), keep: Union[int, float] = 0.5) -> None:
        super().__init__()
        vit = check_vit(vit)
        if vit.cls_token is None:
            raise ValueError("vit must have a class token: tickets are scored by its attention")
        depth = len(vit.blocks)
        self.depths = sorted({d % depth for d in depths}) if depths else []
        if not self.depths or any(not -depth <= d < depth for d in depths):
            raise ValueError(f"depths must be block indices in [-{depth}, {depth}), got {list(depths)}")
        patch_attention(vit)
        for d in self.depths:
            if not isinstance(vit.blocks[d].attn, MaskedAttention):
                raise TypeError(f"block {d} attention cannot report class-token attention")
        self.vit = vit
        self.keep = keep

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Class-token attention to each patch, head-averaged and depth-averaged: (B, N)."""
        vit = self.vit
        p = vit.num_prefix_tokens
        for d in self.depths:
            vit.blocks[d].attn.record_cls_attn = True
        try:
            was = vit.training
            vit.eval()
            x = embed_tokens(vit, images)
            rows = []
            for i, blk in enumerate(vit.blocks):
                x = blk(x)
                if i in self.depths:
                    rows.append(blk.attn.cls_attn[:, :, p:].mean(dim=1))
                if i == self.depths[-1]:
                    break
            vit.train(was)
        finally:
            for d in self.depths:
                vit.blocks[d].attn.record_cls_attn = False
                vit.blocks[d].attn.cls_attn = None
        return torch.stack(rows).mean(0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Indices (B, k) of the kept patches, ascending, in ``[0, N)``."""
        s = self.scores(images)
        k = patch_count(self.keep, s.shape[1])
        return s.topk(k, dim=1).indices.sort(dim=1).values


class RandomPatchSelector(nn.Module):
    """The random-patch control: k patches per image, uniformly, from a seeded generator."""

    def __init__(self, num_patches: int, keep: Union[int, float], seed: int = 0) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.k = patch_count(keep, num_patches)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        noise = torch.rand(b, self.num_patches, generator=self.generator)
        return noise.topk(self.k, dim=1).indices.sort(dim=1).values.to(images.device)


class PatchTicketViT(nn.Module):
    """A timm ViT that runs on selected patches only (``patch_index=None``: all of them)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = check_vit(vit)

    def forward(self, images: torch.Tensor, patch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        vit = self.vit
        x = embed_tokens(vit, images)
        if patch_index is not None:
            p = vit.num_prefix_tokens
            if patch_index.dim() != 2 or patch_index.shape[0] != x.shape[0]:
                raise ValueError(f"patch_index must be (B, k) with B={x.shape[0]}, got {tuple(patch_index.shape)}")
            x = gather_tokens(x, _with_prefix(patch_index, p))
        for blk in vit.blocks:
            x = blk(x)
        return head_from_tokens(vit, vit.norm(x))
