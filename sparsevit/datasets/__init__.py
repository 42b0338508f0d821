"""Small real data sets that run on a CPU, for accuracy suites and tests."""

from .digit_tasks import DIGIT_TASKS, DigitTask, digit_task
from .multi_view import MultiViewDataset, class_patterns, multi_view_dataset, multi_view_splits
from .scattered_digits import ScatteredDigits, scattered_digits_splits

__all__ = ["DIGIT_TASKS", "DigitTask", "digit_task", "MultiViewDataset", "class_patterns", "multi_view_dataset", "multi_view_splits", "ScatteredDigits", "scattered_digits_splits"]
