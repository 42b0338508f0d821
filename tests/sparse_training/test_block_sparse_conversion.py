"""to_block_sparse: block-masked Linears become BlockSparseLinear with the masked model's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsevit.nn import BlockSparseLinear
from sparsevit.sparse_training import MaskManager, RigL, to_block_sparse
from st_helpers import batch, tiny_vit, train_step


def test_rigl_block_masks_convert_with_equal_outputs() -> None:
    model = tiny_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rigl = RigL(model, opt, 0.75, delta_t=2, t_end=6, granularity="block", block_size=16, distribution="uniform")
    for step in range(4):
        train_step(model, opt, step)
        rigl.step()
    x, y = batch(99)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    names = list(rigl.manager.layers)
    report = to_block_sparse(model, rigl.manager)
    assert [n for n, _ in report.converted] == [n for n in names if isinstance(model.get_submodule(n), BlockSparseLinear)]
    assert report.converted and not rigl.manager.layers.keys() & {n for n, _ in report.converted}
    for name, density in report.converted:
        layer = model.get_submodule(name)
        assert isinstance(layer, BlockSparseLinear) and density == pytest.approx(layer.density)
        assert density < 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    # The converted model trains: gradients reach the packed blocks.
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    name = report.converted[0][0]
    assert model.get_submodule(name).weight.grad.abs().sum() > 0
    assert "converted" in str(report)


def test_element_masks_are_reported_not_converted() -> None:
    model = tiny_vit()
    manager = MaskManager(model, 0.5, granularity="element", distribution="uniform")
    report = to_block_sparse(model, manager)
    assert not report.converted
    assert all("element granularity" in why for _, why in report.skipped)
    assert len(report.skipped) == len(manager.layers)


def test_bad_arguments() -> None:
    model = tiny_vit()
    manager = MaskManager(model, 0.5, granularity="block", block_size=16, distribution="uniform")
    with pytest.raises(TypeError, match="masks must be a MaskManager"):
        to_block_sparse(model, {})
    with pytest.raises(ValueError, match="must manage this model"):
        to_block_sparse(tiny_vit(1), manager)
    with pytest.raises(TypeError, match="model must be"):
        to_block_sparse("vit", manager)
