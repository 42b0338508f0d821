"""The table of automatic backend orders: coverage, device classes, and what ``backends()`` shows."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit.backend import DEFAULT_ORDERS, DEVICE_CLASSES, choose_backend, default_lines, default_order, device_class
from sparsevit.cli.info import _families


def test_every_op_has_a_row_per_device_class_naming_its_own_backends() -> None:
    supports = {support.op: support for _, support, _ in _families()}
    assert set(supports) == set(DEFAULT_ORDERS)
    for op, rows in DEFAULT_ORDERS.items():
        assert set(rows) == set(DEVICE_CLASSES), op
        for klass, entry in rows.items():
            assert entry.order and entry.order[-1] == "torch", (op, klass)  # the reference is the last resort
            assert set(entry.order) <= set(supports[op].backends), (op, klass, entry.order)
            assert len(entry.reason) > 20, (op, klass)
            if klass == "cpu":
                assert "triton" not in entry.order and "cuda" not in entry.order, op


def test_block_sparse_defaults_follow_the_compiler_evidence() -> None:
    assert default_order("block_sparse_matmul", "sm_90").order[0] == "triton"
    assert "wgmma" in default_order("block_sparse_matmul", "sm_90").reason
    assert default_order("block_sparse_matmul", "sm_80").order[0] == "triton"
    assert default_order("block_sparse_matmul", "cpu").order == ("cpp", "torch")
    assert default_order("masked_attention", "sm_90").order[0] == "triton"


@pytest.mark.parametrize("capability, klass", [((9, 0), "sm_90"), ((10, 0), "sm_90"), ((8, 6), "sm_80"),
                                               ((8, 0), "sm_80"), ((7, 5), "cuda")])
def test_device_class_by_capability(capability: tuple, klass: str) -> None:
    assert device_class(torch.device("cuda", 0), capability) == klass
    assert device_class(torch.device("cpu"), capability) == "cpu"


def test_unknown_class_and_unlisted_op() -> None:
    with pytest.raises(ValueError, match="device class must be one of"):
        default_order("block_sparse_matmul", "sm_70")
    assert default_order("not_in_table", "sm_90").order == ("cuda", "triton", "torch")
    assert default_order("not_in_table", "cpu").order == ("cpp", "torch")


def test_cpu_choice_uses_the_table() -> None:
    from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT

    x = torch.randn(16, 16)
    expected = "cpp" if sparsevit.backend.CPU_KERNELS_ERROR is None else "torch"
    assert choose_backend(BLOCK_SPARSE_SUPPORT, [x, x[None]]) == expected


def test_backends_shows_the_default_and_reason_per_op(capsys: pytest.CaptureFixture) -> None:
    sparsevit.backends()
    out = capsys.readouterr().out
    assert "default backend per op" in out
    for op in DEFAULT_ORDERS:
        assert f"    {op}: " in out
    lines = default_lines(["sm_80"])
    row = [line for line in lines if "block_sparse_matmul" in line][0]
    assert "triton (order triton > cuda > torch)" in row and "mma.sync" in row
