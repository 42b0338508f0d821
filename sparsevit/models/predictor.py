"""DynamicViT's token-keep predictor (Rao et al., NeurIPS 2021, Sec. 3.2, Eqs. 1-4).

With the current keep mask D̂ over the N patch tokens and C' = C/2:

    h = GELU(Linear(LayerNorm(x)))                      (B, N, C)
    z_local  = h[..., :C']                              (B, N, C')
    z_global = Σ_i D̂_i h_i[C':] / max(Σ_i D̂_i, 1)        (B, 1, C')   (kept tokens only)
    π = LogSoftmax(MLP([z_local, z_global]))            (B, N, 2)

Index 0 of π is "keep", as in the public implementation (``PredictorLG``), whose
parameter names (``in_conv``, ``out_conv``) this module keeps so that its weights
load from public DynamicViT checkpoints.  The denominator is at least 1: with hard
decisions that keep a token it is the plain mean, and an image whose previous stage
kept no token (a training-time sample) gets z_global = 0 with a bounded gradient
instead of one divided by a vanishing count.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TokenPredictor"]


class TokenPredictor(nn.Module):
    """Scores patch tokens for keeping: ``forward(x (B, N, C), keep (B, N, 1)) -> log π (B, N, 2)``."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        if embed_dim < 4 or embed_dim % 4:
            raise ValueError(f"embed_dim must be a positive multiple of 4, got {embed_dim}")
        c = embed_dim
        self.in_conv = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(c, c // 2), nn.GELU(), nn.Linear(c // 2, c // 4), nn.GELU(), nn.Linear(c // 4, 2), nn.LogSoftmax(dim=-1)
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Log keep/drop probabilities per token; ``keep`` is D̂ (1 kept, 0 dropped)."""
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        local, other = h[..., :half], h[..., half:]
        keep = keep.to(h.dtype)
        pooled = (other * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.out_conv(torch.cat([local, pooled.expand_as(local)], dim=-1))
