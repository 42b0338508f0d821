"""Timing with spread, interleaved rounds, and progress lines with an ETA."""

from __future__ import annotations

import io

import pytest
import torch

from sparsevit.cli.progress import Progress, format_seconds, progress
from sparsevit.cli.timing import NOISY_SPREAD, Timing, measure, measure_interleaved, ratio_range


def test_timing_summary() -> None:
    t = Timing((4.0, 1.0, 3.0, 2.0, 5.0))
    assert t.median == 3.0 and t.min == 1.0 and t.max == 5.0 and t.n == 5
    assert (t.q1, t.q3) == (2.0, 4.0)
    assert t.rel_iqr == pytest.approx(2.0 / 3.0) and t.noisy
    assert not Timing((10.0, 10.1, 9.9, 10.0)).noisy
    d = t.as_dict()
    assert d["median_ms"] == 3.0 and d["samples_ms"] == [4.0, 1.0, 3.0, 2.0, 5.0]
    with pytest.raises(ValueError, match="at least one sample"):
        Timing(())
    assert Timing((7.0,)).q1 == Timing((7.0,)).q3 == 7.0
    assert 0 < NOISY_SPREAD < 1


def test_ratio_range_brackets_the_median_ratio() -> None:
    base, ours = Timing((9.0, 10.0, 11.0)), Timing((4.0, 5.0, 6.0))
    lo, hi = ratio_range(base, ours)
    assert lo < base.median / ours.median < hi
    assert lo == pytest.approx(base.q1 / ours.q3) and hi == pytest.approx(base.q3 / ours.q1)


def test_measure_interleaved_alternates_and_counts() -> None:
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = measure_interleaved(fns, torch.device("cpu"), warmup=1, min_rounds=3, budget_s=0.0)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then one call of each per round
    assert out["a"].n == out["b"].n == 3


def test_measure_cpu_takes_at_least_min_reps() -> None:
    calls = []
    t = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, min_reps=7, min_time_s=0.0)
    assert t.n == 7 and len(calls) == 9


def test_progress_lines_with_eta() -> None:
    stream = io.StringIO()
    bar = Progress(3, "demo", stream)
    bar.advance("first")
    bar.advance("second")
    bar.advance("third")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("demo [1/3] first | elapsed ") and "ETA" in lines[0]
    assert lines[2].endswith("done")
    stream = io.StringIO()
    assert list(progress([1, 2], "p", label=lambda i: f"item {i}", stream=stream)) == [1, 2]
    assert "p [2/2] item 2" in stream.getvalue()
    assert format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"
