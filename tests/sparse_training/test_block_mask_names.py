"""block_mask / layer accept a module or its weight's parameter name, and list the valid names on a miss."""

from __future__ import annotations

import pytest
import torch

from sparsevit.sparse_training import MaskManager, RigL
from st_helpers import tiny_vit


def test_module_and_parameter_names() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = RigL(model, opt, 0.5, delta_t=2, t_end=4, granularity="block", block_size=16, distribution="uniform")
    name = next(iter(rigl.manager.layers))
    by_module = rigl.block_mask(name)
    assert torch.equal(rigl.block_mask(name + ".weight"), by_module)
    assert rigl.manager.layer(name + ".weight") is rigl.manager.layers[name]
    w = model.get_submodule(name).weight
    assert by_module.shape == (w.shape[0] // 16, w.shape[1] // 16)


def test_a_miss_lists_the_managed_layers() -> None:
    model = tiny_vit()
    manager = MaskManager(model, 0.5, granularity="block", block_size=16, distribution="uniform")
    with pytest.raises(KeyError, match="not a managed layer; the managed layers are: blocks"):
        manager.block_mask("bad")
    with pytest.raises(KeyError, match="not a managed layer"):
        manager.block_mask("head.weight")  # the head is not masked by default
    with pytest.raises(TypeError, match="name must be a str"):
        manager.block_mask(3)


def test_element_granularity_is_a_value_error() -> None:
    model = tiny_vit()
    manager = MaskManager(model, 0.5, granularity="element", distribution="uniform")
    with pytest.raises(ValueError, match="element granularity"):
        manager.block_mask(next(iter(manager.layers)) + ".weight")


def test_rigl_reports_every_bad_argument_in_signature_order() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError) as info:
        RigL(model, opt, 1.5, delta_t=0, t_end=None, alpha=2.0, granularity="block", block_size=15)
    text = str(info.value)
    assert text.startswith("RigL: 5 bad arguments: ")
    order = [text.index(s) for s in ("sparsity must", "delta_t must", "t_end (the last", "alpha must", "block_size must")]
    assert order == sorted(order)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        RigL(model, "sgd", 0.5, t_end=4)  # a single problem keeps its own type and message
    with pytest.raises(TypeError, match="RigL: 2 bad arguments: model must be .*optimizer must be"):
        RigL("vit", None, 0.5, t_end=4)
