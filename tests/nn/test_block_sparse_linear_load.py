"""BlockSparseLinear.load_state_dict: complete validation first, then one commit.

A refused load must leave every parameter and buffer bit for bit as it was (and the
same objects), and name the key and the problem; a good load keeps the weight's
``nn.Parameter`` object, so an optimizer built before the load keeps training it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from sparsevit import BlockSparseLayout
from sparsevit.nn import BlockSparseLinear

LAYOUT_KEYS = ("row_offsets", "col_indices", "row_indices", "col_offsets", "bsc_row_indices", "bsc_perm")


def _snapshot(mod: nn.Module) -> dict:
    """Bytes, dtype, shape and object identity of every parameter and buffer, plus the attributes."""
    tensors = dict(mod.named_parameters())
    tensors.update(dict(mod.named_buffers()))
    return {
        "tensors": {
            k: (id(v), v.dtype, tuple(v.shape), v.detach().contiguous().reshape(-1).view(torch.uint8).clone())
            for k, v in tensors.items()
        },
        "attrs": (mod.in_features, mod.out_features, mod.block_size, mod.bias is None),
    }


def _assert_unchanged(mod: nn.Module, before: dict) -> None:
    after = _snapshot(mod)
    assert after["attrs"] == before["attrs"]
    assert set(after["tensors"]) == set(before["tensors"])
    for k, (ident, dtype, shape, raw) in before["tensors"].items():
        a_ident, a_dtype, a_shape, a_raw = after["tensors"][k]
        assert (a_ident, a_dtype, a_shape) == (ident, dtype, shape), k
        assert torch.equal(a_raw, raw), k


def _refused(mod: BlockSparseLinear, state: dict, match: str, strict: bool = True) -> None:
    before = _snapshot(mod)
    with pytest.raises(RuntimeError, match=match):
        mod.load_state_dict(state, strict=strict)
    _assert_unchanged(mod, before)


def test_transposed_shape_without_bias_is_refused() -> None:
    """A 128×64 state into a 64×128 layer loaded silently before (the output then had 128 features)."""
    src = BlockSparseLinear(64, 128, sparsity=0.5, block_size=16, bias=False)
    dst = BlockSparseLinear(128, 64, sparsity=0.5, block_size=16, bias=False)
    _refused(dst, src.state_dict(), r"row_offsets.*block rows.*out_features=64")
    assert dst(torch.randn(2, 128)).shape == (2, 64)


def test_shape_mismatch_with_bias_leaves_module_unchanged() -> None:
    """Before: the load raised on the bias after weight and all six index buffers were replaced."""
    src = BlockSparseLinear(64, 128, sparsity=0.25, block_size=16)
    dst = BlockSparseLinear(128, 64, sparsity=0.75, block_size=16)
    _refused(dst, src.state_dict(), "row_offsets")


def test_other_block_size_is_refused() -> None:
    """Before: a block-32 state loaded into a block-16 module, leaving block_size stale."""
    src = BlockSparseLinear(64, 64, sparsity=0.5, block_size=32)
    dst = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    _refused(dst, src.state_dict(), r"block size 32.*block_size=16")


@pytest.mark.parametrize("key, value, match", [
    ("col_indices", 1000, r"col_indices must lie in \[0, 4\)"),
    ("col_indices", -1, r"col_indices must lie in \[0, 4\)"),
    ("row_indices", 9, r"row_indices must lie in \[0, 4\)"),
    ("bsc_perm", 0, "bsc_perm is inconsistent"),
    ("row_offsets", 99, "row_offsets is inconsistent"),
])
def test_corrupted_index_is_refused(key: str, value: int, match: str) -> None:
    """Before: a corrupted col_indices entry (1000) was accepted and the kernel read out of range."""
    src = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    state = src.state_dict()
    state[key] = state[key].clone()
    state[key][1] = value
    dst = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    _refused(dst, state, match)


def test_unsorted_row_is_refused() -> None:
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 1] = mask[0, 3] = mask[2, 0] = True
    src = BlockSparseLinear(64, 64, BlockSparseLayout.from_mask(mask, 16))
    state = src.state_dict()
    state["col_indices"] = state["col_indices"][[1, 0, 2]].contiguous()  # same set, wrong order
    _refused(BlockSparseLinear(64, 64, sparsity=0.5, block_size=16), state, "col_indices is inconsistent")


def test_wrong_dtypes_are_refused() -> None:
    src = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    dst = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    state = src.state_dict()
    state["col_indices"] = state["col_indices"].long()
    _refused(dst, state, "col_indices must be int32")
    state = src.state_dict()
    state["weight"] = state["weight"].to(torch.int32)
    _refused(dst, state, "weight must be a floating-point tensor")
    state = src.state_dict()
    state["bias"] = torch.zeros(64, dtype=torch.bool)
    _refused(dst, state, "bias must be a floating-point tensor")
    state = src.state_dict()
    state["weight"] = [1.0]
    _refused(dst, state, "expected a torch.Tensor")


def test_weight_nnz_must_match_saved_layout() -> None:
    src = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    state = src.state_dict()
    state["weight"] = state["weight"][:-1]
    _refused(BlockSparseLinear(64, 64, sparsity=0.5, block_size=16), state, r"weight.*\(7, 16, 16\)")


def test_bias_shape_and_presence() -> None:
    src = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    dst = BlockSparseLinear(64, 64, sparsity=0.75, block_size=16)
    state = src.state_dict()
    state["bias"] = state["bias"][:32]
    _refused(dst, state, r"bias.*\(64,\)")
    # Missing / unexpected keys follow nn.Module: reported, the consistent rest loads.
    state = src.state_dict()
    del state["bias"]
    bias = dst.bias.detach().clone()
    with pytest.warns(UserWarning, match="resized in place"):
        result = dst.load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"] and dst.layout == src.layout and torch.equal(dst.bias, bias)
    no_bias = BlockSparseLinear(64, 64, sparsity=0.75, block_size=16, bias=False)
    with pytest.warns(UserWarning, match="resized in place"):
        result = no_bias.load_state_dict(src.state_dict(), strict=False)
    assert result.unexpected_keys == ["bias"] and no_bias.layout == src.layout
    with pytest.raises(RuntimeError, match="Unexpected key.*bias"):
        no_bias.load_state_dict(src.state_dict())


def test_partial_layout_is_refused() -> None:
    src = BlockSparseLinear(64, 64, sparsity=0.25, block_size=16)
    dst = BlockSparseLinear(64, 64, sparsity=0.75, block_size=16)
    state = src.state_dict()
    del state["bsc_perm"]
    _refused(dst, state, "bsc_perm", strict=False)
    state = {k: v for k, v in src.state_dict().items() if k in LAYOUT_KEYS}
    _refused(dst, state, "without its weight", strict=False)


def test_same_nnz_copies_in_place() -> None:
    src = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    dst = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    weight, ptr = dst.weight, dst.weight.data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dst.load_state_dict(src.state_dict())
    assert dst.weight is weight and dst.weight.data_ptr() == ptr
    assert dst.layout == src.layout
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


def test_other_nnz_keeps_parameter_so_optimizer_still_trains_it() -> None:
    """Before: a new Parameter was swapped in and the optimizer silently stopped updating the layer."""
    src = BlockSparseLinear(64, 64, sparsity=0.25, block_size=16)
    dst = BlockSparseLinear(64, 64, sparsity=0.75, block_size=16)
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    weight = dst.weight
    with pytest.warns(UserWarning, match=r"kept 4 blocks.*saved layout keeps 12.*optimizer"):
        dst.load_state_dict(src.state_dict())
    assert dst.weight is weight and dst.weight.shape == (12, 16, 16) and dst.weight.grad is None
    assert dst.layout == src.layout
    torch.testing.assert_close(dst.weight, src.weight, atol=0, rtol=0)
    before = dst.weight.detach().clone()
    dst(torch.randn(5, 64)).square().sum().backward()
    opt.step()
    assert not torch.equal(dst.weight.detach(), before)  # the optimizer trains the loaded weight


def test_dtype_converts_like_nn_linear() -> None:
    src = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16, dtype=torch.float64)
    dst = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    dst.load_state_dict(src.state_dict())
    assert dst.weight.dtype == torch.float32
    torch.testing.assert_close(dst.weight, src.weight.float(), atol=0, rtol=0)


def test_non_strict_weight_only_uses_current_layout() -> None:
    mod = BlockSparseLinear(64, 64, sparsity=0.5, block_size=16)
    new = torch.randn_like(mod.weight)
    mod.load_state_dict({"weight": new}, strict=False)
    torch.testing.assert_close(mod.weight, new, atol=0, rtol=0)
    _refused(mod, {"weight": torch.randn(3, 16, 16)}, r"weight.*\(8, 16, 16\)", strict=False)


def test_assign_adopts_saved_tensors() -> None:
    src = BlockSparseLinear(64, 64, sparsity=0.25, block_size=16)
    dst = BlockSparseLinear(64, 64, sparsity=0.25, block_size=16)
    dst.load_state_dict(src.state_dict(), assign=True)
    assert isinstance(dst.weight, nn.Parameter) and dst.weight.requires_grad
    assert dst.layout == src.layout
    torch.testing.assert_close(dst.weight, src.weight, atol=0, rtol=0)


def test_failed_submodule_load_inside_a_model() -> None:
    """Inside a model the failing layer is named by its full key and stays as it was."""
    src = nn.Sequential(BlockSparseLinear(64, 64, sparsity=0.5, block_size=16))
    dst = nn.Sequential(BlockSparseLinear(64, 64, sparsity=0.5, block_size=16))
    state = src.state_dict()
    state["0.col_indices"] = state["0.col_indices"].clone()
    state["0.col_indices"][0] = 1000
    before = _snapshot(dst[0])
    with pytest.raises(RuntimeError, match=r"0\.col_indices"):
        dst.load_state_dict(state)
    _assert_unchanged(dst[0], before)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_autocast_matches_nn_linear(in_dtype: torch.dtype) -> None:
    """Under CPU autocast(bf16) the layer behaves as nn.Linear: bf16 output, fp32 weight grad."""
    dense = nn.Linear(32, 48)
    sparse = BlockSparseLinear.from_dense(dense, block_size=16, sparsity=0.0)
    x = torch.randn(5, 32).to(in_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = dense(x)
        got = sparse(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    got.float().sum().backward()
    assert sparse.weight.grad.dtype == torch.float32
