"""Small real data sets that run on a CPU, for accuracy suites and tests."""

from .scattered_digits import ScatteredDigits, scattered_digits_splits

__all__ = ["ScatteredDigits", "scattered_digits_splits"]
