"""ceil_fraction: fractions become counts by exact rational rounding of the decimal written."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from sparsevit.rounding import ceil_fraction, exact_fraction

# Every two-decimal fraction of every count below 400.
GRID = [(p / 100, m) for p in range(1, 101) for m in range(0, 400)]


def _float_ceil_is_wrong() -> list[tuple[float, int]]:
    """The pairs where ``math.ceil(keep * M)`` differs from the exact ``⌈keep · M⌉``."""
    return [(keep, m) for keep, m in GRID if math.ceil(keep * m) != math.ceil(Fraction(str(keep)) * m)]


def test_exact_on_every_two_decimal_fraction_below_400() -> None:
    wrong = _float_ceil_is_wrong()
    # The grid does hold the float failures (0.28 · 25 = 7.000000000000001 among them).
    assert (0.28, 25) in wrong and len(wrong) >= 29
    for keep, m in GRID:
        assert ceil_fraction(keep, m) == math.ceil(Fraction(str(keep)) * m), (keep, m)
    assert ceil_fraction(0.28, 25) == 7


@pytest.mark.parametrize("power", [1, 2, 3])
def test_powers_are_exact(power: int) -> None:
    """DynamicViT's ⌈ρ^s · N⌉: 0.4² · 25 is 4 (the float product is 4.000000000000001)."""
    for p in range(1, 101):
        for m in (16, 25, 49, 64, 196):
            assert ceil_fraction(p / 100, m, power) == math.ceil(Fraction(p, 100) ** power * m), (p, m, power)
    assert math.ceil(0.4**2 * 25) == 5 and ceil_fraction(0.4, 25, 2) == 4


def test_exact_fraction_reads_the_written_decimal() -> None:
    assert exact_fraction(0.28) == Fraction(7, 25)
    assert exact_fraction(np.float64(0.28)) == Fraction(7, 25)  # a float subclass, repr "np.float64(...)"
    assert exact_fraction(3) == 3
    assert Fraction(0.28) != Fraction(7, 25)  # the binary value is not what was written
    # Excess far below 1e-9 still counts: rounding the product to 9 digits would lose it.
    assert ceil_fraction(0.5000000000001, 2) == 2


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fraction must be >= 0"):
        ceil_fraction(-0.1, 10)
    with pytest.raises(ValueError, match="finite"):
        ceil_fraction(float("nan"), 10)
    with pytest.raises(TypeError, match="int or a float"):
        ceil_fraction(True, 10)
    with pytest.raises(TypeError, match="int or a float"):
        ceil_fraction("0.5", 10)
    with pytest.raises(ValueError, match="total must be"):
        ceil_fraction(0.5, -1)
    with pytest.raises(ValueError, match="total must be"):
        ceil_fraction(0.5, 2.0)
    with pytest.raises(ValueError, match="power must be"):
        ceil_fraction(0.5, 10, 0)
