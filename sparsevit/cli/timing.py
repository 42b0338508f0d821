"""Timing with its spread: every figure is a median of many samples plus their quartiles.

Conventions (the project's benchmarking notes): warm-up first; on a GPU
``triton.testing.do_bench`` (L2 flushed between runs) or a synchronise after every
call; on the CPU wall-clock samples.  A median alone hides noise (two identical runs
on a loaded machine can disagree several-fold), so a :class:`Timing` keeps every
sample and reports the interquartile range; :data:`NOISY_SPREAD` is the relative
IQR above which a table warns that a ratio is not to be trusted.

Comparisons of whole models interleave their samples (A, B, A, B, ...;
:func:`measure_interleaved`), so that a change of machine load during the run hits
every contender alike instead of the one that happened to run then.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["NOISY_SPREAD", "Timing", "measure", "measure_interleaved", "ratio_range", "sync"]

NOISY_SPREAD = 0.10  # IQR / median above which a figure is flagged as noisy


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Samples of one measured region, in milliseconds, and their summary."""

    samples_ms: tuple

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("a Timing needs at least one sample")

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples_ms))

    def _quartiles(self) -> tuple[float, float]:
        if self.n < 2:
            return self.median, self.median
        q1, _, q3 = statistics.quantiles(self.samples_ms, n=4, method="inclusive")
        return float(q1), float(q3)

    @property
    def q1(self) -> float:
        return self._quartiles()[0]

    @property
    def q3(self) -> float:
        return self._quartiles()[1]

    @property
    def min(self) -> float:
        return float(min(self.samples_ms))

    @property
    def max(self) -> float:
        return float(max(self.samples_ms))

    @property
    def rel_iqr(self) -> float:
        """``(q3 − q1) / median``: the spread as a fraction of the figure quoted."""
        med = self.median
        return (self.q3 - self.q1) / med if med > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.rel_iqr > NOISY_SPREAD

    def as_dict(self) -> dict:
        """The summary for a JSON record (samples included, so others can re-derive it)."""
        return {
            "median_ms": self.median, "q1_ms": self.q1, "q3_ms": self.q3, "min_ms": self.min,
            "max_ms": self.max, "n": self.n, "rel_iqr": self.rel_iqr, "samples_ms": list(self.samples_ms),
        }


def ratio_range(baseline: Timing, other: Timing) -> tuple[float, float]:
    """The speed-up ``baseline / other`` at the pessimistic and optimistic quartiles."""
    return baseline.q1 / other.q3, baseline.q3 / other.q1


def _cpu_samples(fn: Callable[[], Any], device: torch.device, warmup: int, min_reps: int, max_reps: int,
                 min_time_s: float) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < min_time_s and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 3,
    min_reps: int = 5,
    max_reps: int = 200,
    min_time_s: float = 0.2,
) -> Timing:
    """Time ``fn()`` on ``device``.

    CUDA: every per-run time of ``triton.testing.do_bench`` (25 ms warm-up, 100 ms of
    runs, L2 flushed between runs).  CPU: ``warmup`` calls, then wall-clock samples
    until at least ``min_reps`` and ``min_time_s`` (at most ``max_reps``).
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return Timing(tuple(float(t) for t in do_bench(fn, warmup=25, rep=100, return_mode="all")))
    return Timing(tuple(_cpu_samples(fn, device, warmup, min_reps, max_reps, min_time_s)))


def measure_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 1,
    min_rounds: int = 5,
    max_rounds: int = 200,
    budget_s: float = 10.0,
    on_round: "Callable[[int], None] | None" = None,
) -> dict[str, Timing]:
    """Time several callables in turns: ``warmup`` calls each, then rounds of one call each.

    Rounds continue until at least ``min_rounds`` and ``budget_s`` seconds (at most
    ``max_rounds``); every call is followed by a device synchronise, so each sample is
    one complete step (the convention for model-level throughput).
    """
    names: Sequence[str] = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < max_rounds):
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
        if on_round is not None:
            on_round(rounds)
    return {name: Timing(tuple(s)) for name, s in samples.items()}
