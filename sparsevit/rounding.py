"""Exact integer rounding of token fractions: ``⌈ρ^s · M⌉`` without floating-point error.

DynamicViT (Rao et al., NeurIPS 2021, Sec. 3.4) keeps ``⌈ρ^s · N⌉`` tokens at stage
``s``; ``select_tokens`` and the patch tickets keep ``⌈keep · M⌉``.  Computed in floats
the product can land just above an integer: ``0.28 * 25 == 7.000000000000001``, so
``math.ceil`` keeps 8 tokens where the fraction 28/100 of 25 is exactly 7.

:func:`ceil_fraction` is the one place where fractions become counts.  It reads the
float ``ρ`` as the decimal it was written as (its shortest round-trip ``repr``, e.g.
``0.28`` -> 28/100) and computes ``⌈ρ^s · M⌉`` in exact rational arithmetic
(:class:`fractions.Fraction`).  Why this and not the alternatives:

* ``Fraction(ρ)`` (the float's exact binary value, 0.28000000000000002665…) is exact
  arithmetic on the wrong number: ``⌈Fraction(0.28) · 25⌉`` is still 8.
* ``math.ceil(round(ρ · M, 9))`` is not exact either: it rounds away real excess below
  1e-9 (``ρ = 0.5000000000001``, ``M = 2`` has ``ρ · M = 1.0000000000002``, so 2 tokens, but
  the rounded product gives 1) and the float product's error grows with ``M``.

The shortest ``repr`` is the decimal with the fewest digits that rounds to the same
float, so for any fraction written with up to 15 significant digits it is exactly the
number written.
"""

from __future__ import annotations

import math
from fractions import Fraction

__all__ = ["exact_fraction", "ceil_fraction"]


def exact_fraction(value: float) -> Fraction:
    """The rational number a float was written as: ``Fraction(repr(value))``.

    ``exact_fraction(0.28) == Fraction(7, 25)``; integers and floats alike.  Raises
    ``ValueError`` for NaN or infinity.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be an int or a float, got {type(value).__name__}")
    if isinstance(value, int):
        return Fraction(value)
    if not math.isfinite(value):
        raise ValueError(f"value must be finite, got {value}")
    # float.__repr__ of a float subclass (numpy.float64 prints as "np.float64(...)").
    return Fraction(float.__repr__(float(value)))


def ceil_fraction(fraction: float, total: int, power: int = 1) -> int:
    """``⌈ρ^power · total⌉`` in exact rational arithmetic, ρ read as :func:`exact_fraction`.

    Args:
        fraction: ρ >= 0 (e.g. a keep ratio in (0, 1]).
        total: the count the fraction is taken of (>= 0).
        power: the exponent s >= 1 (DynamicViT's stage s keeps ρ^s of the tokens).

    Returns:
        The smallest integer >= ρ^power · total.  ``ceil_fraction(0.28, 25) == 7`` and
        ``ceil_fraction(0.7, 16, 2) == 8`` (0.49 · 16 = 7.84).
    """
    rho = exact_fraction(fraction)
    if rho < 0:
        raise ValueError(f"fraction must be >= 0, got {fraction}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    if isinstance(power, bool) or not isinstance(power, int) or power < 1:
        raise ValueError(f"power must be an int >= 1, got {power!r}")
    return math.ceil(rho**power * total)
