"""Layer densities: uniform, ER, ERK against hand-computed values; exact totals; user-given; errors."""

from __future__ import annotations

import math

import pytest

from sparsevit.sparse_training import layer_densities


def _total(shapes, dens):
    return sum(dens[n] * math.prod(s) for n, s in shapes.items())


def test_uniform() -> None:
    shapes = {"a": (4, 4), "b": (8, 2, 3, 3)}
    assert layer_densities(shapes, 0.8, "uniform") == {"a": pytest.approx(0.2), "b": pytest.approx(0.2)}


def test_erk_hand_computed_no_dense_layer() -> None:
    # raw: a = 8/16 = 1/2, b = 16/64 = 1/4; kept = 0.25 * 80 = 20 = ε (16/2 + 64/4) → ε = 5/6
    shapes = {"a": (4, 4), "b": (8, 8)}
    d = layer_densities(shapes, 0.75, "erk")
    assert d["a"] == pytest.approx(5 / 12) and d["b"] == pytest.approx(5 / 24)
    assert _total(shapes, d) == pytest.approx(20)


def test_erk_hand_computed_with_dense_layer() -> None:
    # raw: a = 4/4 = 1, b = 20/100 = 0.2; kept 52; ε = 52/24 makes a > 1 → a dense, ε = 48/20 → b = 0.48
    shapes = {"a": (2, 2), "b": (10, 10)}
    d = layer_densities(shapes, 0.5, "erk")
    assert d == {"a": 1.0, "b": pytest.approx(0.48)}
    assert _total(shapes, d) == pytest.approx(52)


def test_erk_conv_uses_kernel_dims_er_does_not() -> None:
    shapes = {"conv": (4, 2, 3, 3), "fc": (6, 12)}
    erk = layer_densities(shapes, 0.9, "erk")
    er = layer_densities(shapes, 0.9, "er")
    # ERK raw: conv (4+2+3+3)/72 = 1/6, fc 18/72 = 1/4; ER raw: conv 6/8, fc 18/72
    assert erk["conv"] / erk["fc"] == pytest.approx((1 / 6) / (1 / 4))
    assert er["conv"] / er["fc"] == pytest.approx(0.75 / 0.25)
    for d in (erk, er):
        assert _total(shapes, d) == pytest.approx(0.1 * (72 + 72))


@pytest.mark.parametrize("dist", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.9, 0.95, 0.99])
def test_exact_total_and_bounds(dist: str, sparsity: float) -> None:
    shapes = {"qkv": (96, 32), "proj": (32, 32), "fc1": (128, 32), "fc2": (32, 128), "tiny": (2, 3), "conv": (16, 3, 3, 3)}
    d = layer_densities(shapes, sparsity, dist)
    total = sum(math.prod(s) for s in shapes.values())
    assert _total(shapes, d) == pytest.approx((1 - sparsity) * total, rel=1e-12)
    assert all(0 < v <= 1 for v in d.values())


def test_user_given() -> None:
    shapes = {"a": (4, 4), "b": (8, 8)}
    assert layer_densities(shapes, 0.5, {"a": 1.0, "b": 0.1}) == {"a": 1.0, "b": 0.1}
    with pytest.raises(ValueError, match="missing"):
        layer_densities(shapes, 0.5, {"a": 1.0})
    with pytest.raises(ValueError, match=r"distribution\['b'\] must lie in \(0, 1\]"):
        layer_densities(shapes, 0.5, {"a": 1.0, "b": 1.5})


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad: float) -> None:
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        layer_densities({"a": (4, 4)}, bad)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="sparsity must be a float"):
        layer_densities({"a": (4, 4)}, "0.5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution must be one of"):
        layer_densities({"a": (4, 4)}, 0.5, "gaussian")
    with pytest.raises(ValueError, match="shapes must be a non-empty mapping"):
        layer_densities({}, 0.5)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsevit.sparse_training.masks import allocate_units  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=6),
    sparsity=st.floats(0.0, 0.99),
    dist=st.sampled_from(["uniform", "er", "erk"]),
)
def test_densities_and_allocation_property(dims, sparsity: float, dist: str) -> None:
    shapes = {f"l{i}": s for i, s in enumerate(dims)}
    d = layer_densities(shapes, sparsity, dist)
    units = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(units.values())
    assert all(0 < v <= 1 + 1e-12 for v in d.values())
    assert _total(shapes, d) == pytest.approx((1 - sparsity) * total, rel=1e-9)
    counts = allocate_units(units, d)
    assert sum(counts.values()) == round(sum(d[n] * units[n] for n in units))
    for n in units:
        assert 0 <= counts[n] <= units[n]
        assert abs(counts[n] - d[n] * units[n]) < 1 + 1e-9
