"""Pictures of which patches were kept: DynamicViT stages and patch tickets.

``render_kept_patches`` dims the dropped patches of an image (kept ones at full
brightness, dropped ones at ``dim`` of it, kept patches outlined) and writes a PNG.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["kept_patch_overlay", "render_kept_patches"]


def kept_patch_overlay(image: torch.Tensor, patch_index: torch.Tensor, patch_size: int, dim: float = 0.25,
                       *, num_prefix: int = 0) -> torch.Tensor:
    """(3, H, W) image in [0, 1] with patches outside ``patch_index`` (positions in row-major
    patch order, ``[0, (H/p)·(W/p))``) dimmed to ``dim`` of their brightness.

    ``num_prefix``: ``patch_index`` counts ``num_prefix`` prefix tokens first (DynamicViT's
    ``return_index=True`` output: token positions, class token 0); entries below it are
    dropped and the rest shifted down by it.
    """
    if isinstance(num_prefix, bool) or not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix must be an int >= 0, got {num_prefix!r}")
    if not isinstance(patch_index, torch.Tensor):
        raise TypeError(f"patch_index must be a torch.Tensor, got {type(patch_index).__name__}")
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    c, h, w = image.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the image size {h}×{w}")
    gh, gw = h // patch_size, w // patch_size
    img = image.detach().float().cpu()
    img = img.expand(3, h, w) if c == 1 else img[:3]
    lo, hi = img.min(), img.max()
    img = (img - lo) / (hi - lo).clamp_min(1e-6)
    keep = torch.zeros(gh * gw, dtype=torch.bool)
    idx = patch_index.detach().cpu().long().flatten()
    if num_prefix:
        idx = idx[idx >= num_prefix] - num_prefix
    if idx.numel() and (idx.min() < 0 or idx.max() >= gh * gw):
        hint = "" if num_prefix else " (token positions from DynamicViT count the prefix tokens: pass num_prefix=)"
        raise ValueError(f"patch_index entries must lie in [0, {gh * gw}){hint}")
    keep[idx] = True
    pixel_keep = keep.view(gh, gw).repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
    out = torch.where(pixel_keep, img, img * dim)
    edge = torch.zeros(h, w, dtype=torch.bool)  # outline of kept patches
    for i in torch.nonzero(keep).flatten().tolist():
        r, q = divmod(i, gw)
        t, l = r * patch_size, q * patch_size
        edge[t, l:l + patch_size] = edge[t + patch_size - 1, l:l + patch_size] = True
        edge[t:t + patch_size, l] = edge[t:t + patch_size, l + patch_size - 1] = True
    out[0][edge], out[1][edge], out[2][edge] = 1.0, 0.8, 0.0
    return out


def render_kept_patches(image: torch.Tensor, stages: Sequence[torch.Tensor], patch_size: int, path: str,
                        *, num_prefix: int = 0) -> str:
    """Write a PNG: the input, then one panel per stage's kept patches, left to right; return ``path``.

    ``stages``: per stage, the kept patch positions of this image, ``(K,)`` or ``(1, K)``.
    For DynamicViT's ``logits, kept = model.eval()(images, return_index=True)`` pass
    ``[idx[b] for idx in kept]`` with ``num_prefix=model.num_prefix`` (its positions count
    the prefix tokens).
    """
    from PIL import Image

    stages = list(stages)
    for s, st in enumerate(stages):
        if isinstance(st, torch.Tensor) and st.dim() == 2 and st.shape[0] != 1:
            raise ValueError(f"stages[{s}] must be one image's indices (K,) or (1, K), got shape {tuple(st.shape)}: "
                             "pick the image, e.g. [idx[b] for idx in kept]")

    panels = [kept_patch_overlay(image, torch.arange((image.shape[1] // patch_size) * (image.shape[2] // patch_size)), patch_size, 1.0)]
    panels += [kept_patch_overlay(image, s, patch_size, num_prefix=num_prefix) for s in stages]
    gap = torch.ones(3, image.shape[1], 2)
    row = torch.cat([t for p in panels for t in (p, gap)][:-1], dim=2)
    scale = max(1, 256 // image.shape[1])
    row = row.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    Image.fromarray((row.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()).save(path)
    return path
