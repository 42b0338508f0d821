"""One filter convention everywhere: filter=(name, module) or torchao's filter_fn=(module, fqn); heads excluded by default."""

from __future__ import annotations

import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sparsevit.layer_filters import default_filter, is_stem_or_head, resolve_filter
from sparsevit.nn import BlockSparseLinear, sparsify_linears
from sparsevit.sparse_training import MaskManager, RigL


def _vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=16)


def test_heads_are_excluded_by_default_in_both_entry_points() -> None:
    vit = _vit()
    report = sparsify_linears(vit, block_size=16, sparsity=0.5)
    assert "head" in report.skipped and "excluded by default" in report.skipped["head"]
    assert not isinstance(vit.head, BlockSparseLinear) and len(report.converted) == 8  # qkv, proj, fc1, fc2 x 2
    manager = MaskManager(_vit(), 0.5, granularity="block", block_size=16, distribution="uniform")
    assert set(manager.layers) == set(report.converted)


def test_torchao_order_filter_fn() -> None:
    a, b = _vit(), _vit()
    ours = sparsify_linears(a, block_size=16, sparsity=0.5, filter=lambda name, m: ".mlp." in name)
    theirs = sparsify_linears(b, block_size=16, sparsity=0.5, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and ".mlp." in fqn)
    assert ours.converted == theirs.converted and len(ours.converted) == 4
    m1 = MaskManager(_vit(), 0.5, granularity="block", block_size=16, distribution="uniform",
                     filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.endswith("fc1"))
    assert list(m1.layers) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    opt = torch.optim.SGD(_vit().parameters(), lr=0.1)
    vit = _vit()
    opt = torch.optim.SGD(vit.parameters(), lr=0.1)
    rigl = RigL(vit, opt, 0.5, delta_t=2, t_end=4, granularity="block", block_size=16, distribution="uniform",
                filter_fn=lambda m, fqn: fqn.endswith("qkv"))
    assert list(rigl.manager.layers) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_a_filter_in_the_wrong_order_warns() -> None:
    vit = _vit()
    with pytest.warns(UserWarning, match="torchao's filter_fn order is"):
        report = sparsify_linears(vit, block_size=16, sparsity=0.5, filter=lambda m, fqn: isinstance(m, nn.Linear))
    assert not report.converted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify_linears(_vit(), block_size=16, sparsity=0.5, filter=lambda name, m: "mlp" in name)


def test_both_or_bad_filters_are_refused() -> None:
    with pytest.raises(TypeError, match="not both"):
        sparsify_linears(_vit(), block_size=16, sparsity=0.5, filter=lambda n, m: True, filter_fn=lambda m, n: True)
    with pytest.raises(TypeError, match="filter_fn must be a callable"):
        MaskManager(_vit(), 0.5, filter_fn="mlp")
    with pytest.raises(TypeError, match="filter must be a callable"):
        resolve_filter("mlp", None, default_filter)
    with pytest.raises(TypeError, match="model must be"):
        sparsify_linears("vit", block_size=16, sparsity=0.5)


def test_stem_and_head_names() -> None:
    for name in ("head", "patch_embed.proj", "fc", "stem.conv", "pre_logits.fc", "head.fc"):
        assert is_stem_or_head(name)
    for name in ("blocks.0.mlp.fc1", "blocks.0.attn.qkv", "fc1", "layer1.0.fc"):
        assert not is_stem_or_head(name)
