"""Inputs and error measures shared by the masked-attention and masked-softmax tests."""

from __future__ import annotations

from typing import Optional

import torch


def make_keep(kind: str, b: int, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """A (B, N) keep mask: none / ones / zeros / bool / soft (float in [0, 1])."""
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(b, n, device=device)
    if kind == "zeros":
        return torch.zeros(b, n, device=device)
    if kind == "bool":
        return torch.rand(b, n, device=device) > 0.4
    if kind == "soft":
        return torch.rand(b, n, device=device)
    raise ValueError(kind)


def dynamicvit_softmax(attn: torch.Tensor, keep: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """The public DynamicViT ``softmax_with_policy`` as published (gradient through the max)."""
    if keep is None:
        return attn.float().softmax(-1).type_as(attn)
    b, n = keep.shape
    policy = keep.to(attn.dtype).reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=policy.dtype, device=policy.device).view(1, 1, n, n)
    policy = policy + (1.0 - policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.to(torch.float32).exp_() * policy.to(torch.float32)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def dynamicvit_attention(q, k, v, keep, scale, eps):
    """DynamicViT's unfused attention in the dtype of its inputs (PyTorch's own same-dtype result)."""
    attn = (q @ k.transpose(-2, -1)) * scale
    return dynamicvit_softmax(attn, keep, eps) @ v


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0
