"""Patch tickets: selection by class-token attention, running on selected patches, rendering."""

from __future__ import annotations

import pytest
import torch

from sparsevit.models import PatchTicketViT, RandomPatchSelector, TicketSelector
from sparsevit.models.render import kept_patch_overlay, render_kept_patches
from sparsevit.models.vit_parts import embed_tokens
from vit_factory import VARIANTS, tiny_vit


def test_selector_keeps_top_attention_patches() -> None:
    vit = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    selector = TicketSelector(vit, depths=[1, 3], keep=0.25)
    index = selector(images)
    assert index.shape == (3, 4)
    assert (index[:, 1:] > index[:, :-1]).all()
    # Independent check: class-token attention recomputed from q, k of blocks 1 and 3.
    x = embed_tokens(vit, images)
    rows = []
    with torch.no_grad():
        for i, blk in enumerate(vit.blocks):
            if i in (1, 3):
                attn = blk.attn
                h = blk.norm1(x)
                qkv = attn.qkv(h).reshape(3, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
                a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
                rows.append(a[:, :, 0, 1:].mean(1))
            x = blk(x)
    expected = torch.stack(rows).mean(0).topk(4, dim=1).indices.sort(dim=1).values
    assert torch.equal(index, expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ticket_vit_on_all_patches_equals_dense(variant: str) -> None:
    vit = tiny_vit(**VARIANTS[variant])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = vit(images)
        model = PatchTicketViT(vit)
        torch.testing.assert_close(model(images), dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(images, torch.arange(16).expand(2, 16)), dense, atol=1e-5, rtol=1e-5)


def test_ticket_vit_equals_dropping_patches_at_input() -> None:
    vit = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    index = torch.tensor([[0, 3, 7, 15], [1, 2, 8, 9]])
    with torch.no_grad():
        out = PatchTicketViT(vit)(images, index)
        x = embed_tokens(vit, images)
        kept = torch.stack([torch.cat([x[b, :1], x[b, 1:][index[b]]]) for b in range(2)])
        expected = vit.forward_head(vit.norm(vit.blocks(kept)))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_random_selector_and_errors() -> None:
    sel = RandomPatchSelector(16, 5, seed=3)
    a = sel(torch.zeros(4, 3, 32, 32))
    assert a.shape == (4, 5) and (a[:, 1:] > a[:, :-1]).all() and a.max() < 16
    assert torch.equal(RandomPatchSelector(16, 5, seed=3)(torch.zeros(4, 3, 32, 32)), a)
    with pytest.raises(ValueError, match="keep must lie"):
        RandomPatchSelector(16, 17)
    with pytest.raises(ValueError, match="ratio must lie"):
        RandomPatchSelector(16, 0.0)
    with pytest.raises(ValueError, match="class token"):
        TicketSelector(tiny_vit(class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="depths must be"):
        TicketSelector(tiny_vit(), depths=[7])
    with pytest.raises(ValueError, match="patch_index must be"):
        PatchTicketViT(tiny_vit())(torch.randn(2, 3, 32, 32), torch.zeros(3, 2, dtype=torch.long))


def test_render(tmp_path) -> None:
    image = torch.rand(3, 32, 32)
    over = kept_patch_overlay(image, torch.tensor([0, 5]), 8)
    assert over.shape == (3, 32, 32)
    norm = (image - image.min()) / (image.max() - image.min())
    torch.testing.assert_close(over[:, 9:15, 9:15], norm[:, 9:15, 9:15])  # patch 5 (row 1, col 1) kept
    torch.testing.assert_close(over[:, 8:16, 16:24], norm[:, 8:16, 16:24] * 0.25)  # patch 6 dropped: dimmed
    path = render_kept_patches(image, [torch.tensor([0, 5, 6]), torch.tensor([5])], 8, str(tmp_path / "k.png"))
    from PIL import Image

    assert Image.open(path).size[0] > 3 * 32
