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


def _rigl_run(seed: int = 0):
    model = tiny_vit(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    rigl = RigL(model, opt, 0.75, delta_t=2, t_end=4, granularity="block", block_size=16, distribution="uniform")
    for step in range(5):  # past t_end: the masks are final
        train_step(model, opt, step)
        rigl.step()
    return model, opt, rigl


def test_conversion_moves_the_optimizer_and_training_continues_exactly() -> None:
    import copy

    model, opt, rigl = _rigl_run()
    twin, twin_opt = copy.deepcopy((model, opt))  # the masked dense run, continued with the same masks
    twin_masks = {n: layer.element_mask.clone() for n, layer in rigl.manager.layers.items()}
    report = to_block_sparse(model, rigl.manager)  # the optimizer attached by RigL is updated
    assert report.converted and report.optimizer_updated and "holds the new parameters" in str(report)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} == held  # exactly the live parameters, no stale ones
    first = model.get_submodule(report.converted[0][0])
    assert opt.state[first.weight]["exp_avg"].shape == first.weight.shape
    with pytest.raises(RuntimeError, match="holds no layer"):
        rigl.step()  # every layer converted: stepping would silently do nothing
    for step in range(5, 8):
        x, y = batch(step)
        losses = []
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            for name, mask in twin_masks.items():
                w = twin.get_submodule(name).weight
                w.mul_(mask.to(w.dtype))
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for name, _ in report.converted:
        torch.testing.assert_close(model.get_submodule(name).to_dense().weight, twin.get_submodule(name).weight,
                                   atol=1e-5, rtol=1e-5)


def test_conversion_without_an_optimizer_warns_in_training_mode_only() -> None:
    model = tiny_vit()
    manager = MaskManager(model, 0.5, granularity="block", block_size=16, distribution="uniform")
    with pytest.warns(UserWarning, match="no optimizer holds"):
        report = to_block_sparse(model.train(), manager)
    assert report.converted and not report.optimizer_updated and "none updated" in str(report)
    model = tiny_vit()
    manager = MaskManager(model, 0.5, granularity="block", block_size=16, distribution="uniform")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_block_sparse(model.eval(), manager)  # for inference: nothing to warn about


def test_an_optimizer_missing_the_layers_is_refused_before_anything_changes() -> None:
    model = tiny_vit()
    manager = MaskManager(model, 0.5, granularity="block", block_size=16, distribution="uniform")
    other = torch.optim.SGD(tiny_vit(1).parameters(), lr=0.1)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="optimizer does not hold"):
        to_block_sparse(model, manager, optimizer=other)
    assert [type(m) for m in model.modules()] == before and manager.layers
    with pytest.raises(TypeError, match="optimizer must be"):
        to_block_sparse(model, manager, optimizer="adam")


def test_train_block_sparse_report_names_what_the_layers_became() -> None:
    from sparsevit.sparse_training import train_block_sparse

    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, 0.5, delta_t=2, t_end=4, granularity="block", block_size=16, distribution="uniform")
    text = str(train_block_sparse(rigl.manager))
    assert text.startswith("converted ") and "to BlockSparseTrainedLinear" in text and "optimizer" not in text
