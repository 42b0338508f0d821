"""Signature building of the kernel report from a launch's values: Triton's specialisation rules
and loud errors when a kernel and its spec disagree (on a stand-in for a JIT function)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from sparsevit.kernel_report.subsets import select  # noqa: E402
from sparsevit.kernel_report.triton_specs import (Launch, Ptr, SpecError, build_signature, config_label,  # noqa: E402
                                                  contiguous_strides, specialize)


def _param(name: str, constexpr: bool = False, default=None, has_default: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, is_constexpr=constexpr, do_not_specialize=False,
                           do_not_specialize_on_alignment=False, has_default=has_default, default=default)


FN = SimpleNamespace(
    arg_names=["x_ptr", "out_ptr", "n", "stride", "unit", "scale", "BLOCK", "FLAG"],
    params=[_param("x_ptr"), _param("out_ptr"), _param("n"), _param("stride"), _param("unit"), _param("scale"),
            _param("BLOCK", True), _param("FLAG", True, default=False, has_default=True)],
)


@pytest.mark.parametrize("value, expected", [
    (Ptr("bf16"), ("*bf16", "D")), (Ptr("i32"), ("*i32", "D")), (64, ("i32", "D")), (197, ("i32", "")),
    (1, ("constexpr", 1)), (2**33, ("i64", "D")), (0.5, ("fp32", None)),
])
def test_specialize_like_a_launch(value, expected) -> None:
    assert specialize(value) == expected


def test_build_signature() -> None:
    args = dict(x_ptr=Ptr("fp16"), out_ptr=Ptr("fp32"), n=197, stride=384, unit=1, scale=0.125)
    sig, constexprs, attrs = build_signature(FN, args, dict(BLOCK=64), "test")
    assert sig == {"x_ptr": "*fp16", "out_ptr": "*fp32", "n": "i32", "stride": "i32", "unit": "constexpr",
                   "scale": "fp32", "BLOCK": "constexpr", "FLAG": "constexpr"}
    assert constexprs == {(4,): 1, (6,): 64, (7,): False}        # the unit stride, the config, the default
    assert sorted(attrs) == [(0,), (1,), (3,)]                     # aligned pointers and the multiple of 16
    assert attrs[(3,)] == [["tt.divisibility", 16]]


@pytest.mark.parametrize("args, consts, message", [
    (dict(x_ptr=Ptr("fp16"), out_ptr=Ptr("fp32"), n=1, stride=1, scale=1.0), dict(BLOCK=64), "argument unit has no value"),
    (dict(x_ptr=Ptr("fp16"), out_ptr=Ptr("fp32"), n=1, stride=1, unit=1, scale=1.0), {}, "constexpr BLOCK has no value"),
    (dict(x_ptr=Ptr("fp16"), out_ptr=Ptr("fp32"), n=1, stride=1, unit=1, scale=1.0, gone=3), dict(BLOCK=64),
     "does not have: gone"),
    (dict(x_ptr=Ptr("fp16"), out_ptr=Ptr("fp32"), n=1, stride=1, scale=1.0), dict(BLOCK=64, unit=1),
     "unit is a runtime argument"),
])
def test_build_signature_errors(args: dict, consts: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        build_signature(FN, args, consts, "test")


def test_helpers() -> None:
    assert contiguous_strides((8, 6, 197, 64)) == (6 * 197 * 64, 197 * 64, 64, 1)
    assert config_label({"BLOCK_M": 64, "BLOCK_N": 32}, 4, 3) == "BLOCK_M=64,BLOCK_N=32 w4 s3"
    with pytest.raises(SpecError, match="unknown pointer element type"):
        Ptr("float")


def test_subsets() -> None:
    def launch(kernel: str, dtype: str) -> Launch:
        return Launch("fam", "mod", kernel, {}, {}, [1, 2, 3], dict(dtype=dtype))

    launches = [launch("a", "fp32"), launch("a", "bf16"), launch("b", "fp32")]
    quick = select(launches, "quick")
    assert [(lch.kernel, lch.labels["dtype"], n, caps) for lch, n, caps in quick] == [("a", "bf16", 1, None),
                                                                                      ("b", "fp32", 1, None)]
    assert [n for _, n, _ in select(launches, None, max_configs=2)] == [2, 2, 2]
    with pytest.raises(ValueError, match="unknown subset"):
        select(launches, "nope")


def test_configs_per_architecture() -> None:
    from sparsevit.kernel_report.triton_specs import configs_for

    shared = Launch("fam", "mod", "k", {}, {}, ["a", "b"])
    per_arch = Launch("fam", "mod", "k", {}, {}, {80: ["a"], 90: ["b", "c"]})
    assert configs_for(shared, 80) == configs_for(shared, 90) == ["a", "b"]
    assert configs_for(per_arch, 90) == ["b", "c"]
    with pytest.raises(SpecError, match="no configs for sm_75"):
        configs_for(per_arch, 75)
