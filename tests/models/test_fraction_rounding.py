"""Fractions of tokens become counts by exact rounding in the models (DynamicViT, patch tickets)."""

from __future__ import annotations

import math

import torch

from sparsevit.models import DynamicViT
from sparsevit.models.patch_ticket import patch_count
from vit_factory import tiny_vit


def test_dynamicvit_inference_counts_are_exact() -> None:
    """25 patches at ρ = 0.4: stage 2 keeps ⌈0.16 · 25⌉ = 4, not the float ⌈4.000000000000001⌉ = 5."""
    assert math.ceil(0.4**2 * 25) == 5  # the float failure this guards against
    vit = tiny_vit(depth=3, img_size=20, patch_size=4)
    model = DynamicViT(vit, keep_ratio=0.4, prune_at=[1, 2]).eval()
    p = vit.num_prefix_tokens
    with torch.no_grad():
        _, kept = model(torch.randn(2, 3, 20, 20), return_index=True)
    assert [index.shape[1] - p for index in kept] == [10, 4]


def test_patch_ticket_count_is_exact() -> None:
    assert math.ceil(0.28 * 25) == 8
    assert patch_count(0.28, 25) == 7
    assert patch_count(0.001, 25) == 1  # at least one patch
