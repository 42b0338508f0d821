"""Small real data sets that run on a CPU, for accuracy suites and tests."""

from .cluttered_digits import ClutteredDigits, cluttered_digits_splits
from .digit_tasks import DIGIT_TASKS, DigitTask, digit_task
from .multi_view import MultiViewDataset, class_patterns, multi_view_dataset, multi_view_splits
from .scattered_digits import ScatteredDigits, scattered_digits_splits, upscaled_digits

__all__ = ["ClutteredDigits", "cluttered_digits_splits", "DIGIT_TASKS", "DigitTask", "digit_task", "MultiViewDataset", "class_patterns", "multi_view_dataset", "multi_view_splits", "ScatteredDigits", "scattered_digits_splits", "upscaled_digits"]
