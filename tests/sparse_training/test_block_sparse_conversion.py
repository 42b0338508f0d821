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


def test_training_on_block_sparse_kernels_matches_masked_dense() -> None:
    import copy

    from sparsevit.sparse_training import BlockSparseTrainedLinear, train_block_sparse

    dense_model = tiny_vit()
    sparse_model = copy.deepcopy(dense_model)
    runs = []
    for model in (dense_model, sparse_model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        rigl = RigL(model, opt, 0.75, delta_t=3, t_end=9, granularity="block", block_size=16, distribution="uniform")
        runs.append((model, opt, rigl))
    report = train_block_sparse(runs[1][2].manager)
    assert report.converted and all(isinstance(sparse_model.get_submodule(n), BlockSparseTrainedLinear) for n, _ in report.converted)
    assert list(sparse_model.state_dict()) == list(dense_model.state_dict())
    assert all(0.0 < d < 1.0 for _, d in report.converted)
    for step in range(5):  # steps 0..4 include a mask update (RigL step 3)
        x, y = batch(step)
        losses, grads = [], []
        for model, opt, rigl in runs:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: model.get_submodule(n).weight.grad.clone() for n, _ in report.converted})
            opt.step()
            rigl.step()
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)
    for name, _ in report.converted:
        layer = sparse_model.get_submodule(name)
        mask = runs[1][2].manager.layers[name].mask
        assert torch.equal(layer.current_layout().to_mask(), mask)
        assert torch.equal(mask, runs[0][2].manager.layers[name].mask)  # same decisions as the dense-masked run
