"""The analytic roofline estimate: its floor formula and what the model implies."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import roofline_estimate as R  # noqa: E402


def test_floor_is_the_larger_of_compute_and_memory() -> None:
    assert R.floor_s(989e12, 0) == pytest.approx(1.0)
    assert R.floor_s(0, 3.35e12) == pytest.approx(1.0)
    assert R.floor_s(989e12, 2 * 3.35e12) == pytest.approx(2.0)


def test_dds_floor_counts_nonzero_work_and_minimum_bytes() -> None:
    floor, est = R.dds_estimate(768, 3072, 0.5, R.BACKENDS[0])
    flops = 2 * R.M_TOKENS * 768 * 3072 * 0.5
    nbytes = 2 * (R.M_TOKENS * 768 + 0.5 * 768 * 3072 + R.M_TOKENS * 3072)
    assert floor == pytest.approx(max(flops / R.PEAK_FLOPS, nbytes / R.HBM_BYTES_PER_S))
    assert est >= floor


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_estimates_never_beat_the_floor_and_rank_the_paths(density: float) -> None:
    times = []
    for be in R.BACKENDS:
        floor, est = R.sdd_estimate(768, 3072, density, be)
        assert est >= floor
        times.append(R.dds_estimate(768, 3072, density, be)[1] + est)
    assert times[0] <= times[1] <= times[2]


def test_prints_the_table(capsys: pytest.CaptureFixture) -> None:
    assert R.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ESTIMATES, not measurements") and out.count("cuda (WMMA)") == 6
