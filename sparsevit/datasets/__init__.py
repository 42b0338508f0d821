"""Small real data sets that run on a CPU, for accuracy suites and tests."""

from .digit_tasks import DIGIT_TASKS, DigitTask, digit_task
from .scattered_digits import ScatteredDigits, scattered_digits_splits

__all__ = ["DIGIT_TASKS", "DigitTask", "digit_task", "ScatteredDigits", "scattered_digits_splits"]
