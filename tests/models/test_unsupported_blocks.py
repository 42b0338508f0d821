"""DynamicViT and patch_attention with blocks they cannot mask: clear errors and reports, nothing touched."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock

from sparsevit.integrations import patch_attention
from sparsevit.models import DynamicViT
from sparsevit.models.render import kept_patch_overlay, render_kept_patches
from sparsevit.nn import MaskedAttention
from vit_factory import tiny_vit


def _attention_types(model: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, Attention)]


def test_parallel_scaling_blocks_are_refused_before_anything_changes() -> None:
    vit = tiny_vit(block_fn=ParallelScalingBlock)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    with pytest.raises(TypeError, match=r"block 1 \(.*ParallelScalingBlock\) cannot take a keep mask: it has no \.attn"):
        DynamicViT(vit, keep_ratio=0.7)
    assert not hasattr(vit, "sparsevit_patch_report")
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_parallel_things_blocks_are_refused_and_left_unpatched() -> None:
    vit = tiny_vit(block_fn=ParallelThingsBlock)
    types = _attention_types(vit)
    with pytest.raises(TypeError, match="ParallelThingsBlock"):
        DynamicViT(vit, keep_ratio=0.7)
    assert _attention_types(vit) == types and "MaskedAttention" not in types  # patched nothing


def test_patch_attention_reports_parallel_blocks() -> None:
    vit = patch_attention(tiny_vit(block_fn=ParallelScalingBlock))
    report = vit.sparsevit_patch_report
    assert not report.swapped
    reasons = dict(report.skipped)
    assert set(reasons) == {f"blocks.{i}" for i in range(4)}
    assert all("computes its attention inside the block" in why for why in reasons.values())
    # ordinary blocks: every attention swapped, no block reported
    plain = patch_attention(tiny_vit()).sparsevit_patch_report
    assert len(plain.swapped) == 4 and not plain.skipped


def test_return_index_in_training_mode_is_an_error() -> None:
    model = DynamicViT(tiny_vit(), keep_ratio=0.5).train()
    with pytest.raises(ValueError, match="return_index=True needs eval mode"):
        model(torch.randn(2, 3, 32, 32), return_index=True)


def test_render_takes_dynamicvit_indices(tmp_path) -> None:
    model = DynamicViT(tiny_vit(), keep_ratio=0.5).eval()
    assert isinstance(model.vit.blocks[1].attn, MaskedAttention)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _, kept = model(images, return_index=True)
    stages = [idx[1] for idx in kept]
    with pytest.raises(ValueError, match="pass num_prefix="):
        render_kept_patches(images[1], stages, 8, str(tmp_path / "bad.png"))
    path = render_kept_patches(images[1], stages, 8, str(tmp_path / "k.png"), num_prefix=model.num_prefix)
    assert (tmp_path / "k.png").stat().st_size > 0 and path.endswith("k.png")
    # the overlay keeps exactly the stage's patches: positions minus the prefix
    patches = (stages[0][stages[0] >= 1] - 1).tolist()
    a = kept_patch_overlay(images[1], stages[0], 8, num_prefix=1)
    b = kept_patch_overlay(images[1], torch.tensor(patches), 8)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"stages\[0\] must be one image's indices"):
        render_kept_patches(images[1], kept, 8, str(tmp_path / "x.png"), num_prefix=1)
    with pytest.raises(ValueError, match="num_prefix must be an int"):
        kept_patch_overlay(images[1], stages[0], 8, num_prefix=-1)


def test_skip_reasons_name_the_right_feature() -> None:
    from timm.layers import AttentionRope
    from timm.models.cait import LayerScaleBlockClassAttn
    from timm.models.vision_transformer_sam import Attention as SamAttention

    model = torch.nn.ModuleDict({
        "sam": SamAttention(32, num_heads=2, use_rel_pos=True, input_size=(4, 4)),
        "rope": AttentionRope(32, num_heads=2),
        "cait_block": LayerScaleBlockClassAttn(32, num_heads=2),
    })
    reasons = dict(patch_attention(model).sparsevit_patch_report.skipped)
    assert "rotary" not in reasons["sam"] and "decomposed relative position" in reasons["sam"]
    assert "rotary position embedding" in reasons["rope"]
    assert "cait_block" not in reasons  # a block is not an attention module
    assert "cait_block.attn" in reasons  # its ClassAttn inside is, with a reason
