"""The benchmark harness: environment, timing, device peaks, records, table, progress.

How we measure (see BENCHMARKING.md): every kernel is checked against its reference
on the very inputs it is timed on; GPU times are medians of
``triton.testing.do_bench`` (warm-up, L2 flushed between runs) with inputs rotated
so the L2 cache does not flatter; CPU times are wall-clock medians after warm-up.
Every median carries its spread (the interquartile range of its samples), shown in
every table and flagged when large.  Peaks (copy bandwidth, matmul throughput) are
measured in the same run, so derived fractions compare like with like.  Each result
is one JSON record; a sparsevit backend that cannot run a point is a record too,
with the reason (:meth:`Runner.split_backends`), never a silently missing row.

The environment, timing and progress code lives in the package
(:mod:`sparsevit.cli`), shared with ``python -m sparsevit bench``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

from sparsevit.backend import OpSupport
from sparsevit.cli.env import environment
from sparsevit.cli.progress import Progress
from sparsevit.cli.progress import progress as _progress
from sparsevit.cli.timing import NOISY_SPREAD, Timing, measure

__all__ = ["Progress", "Record", "Runner", "TimedMs", "environment", "time_ms", "timed_samples",
           "copy_bandwidth_gbps", "matmul_peak_tflops", "format_table", "spread_warning"]

T = TypeVar("T")


class TimedMs(float):
    """A median in milliseconds that also carries the :class:`Timing` it summarises.

    It is a float so that the suites compute ratios with it as with any number;
    :meth:`Runner.add` moves the spread into the record.
    """

    timing: Timing

    def __new__(cls, timing: Timing) -> "TimedMs":
        obj = super().__new__(cls, timing.median)
        obj.timing = timing
        return obj


def time_ms(fn: Callable[[], Any], device: torch.device, *, min_time_s: float = 0.2, max_reps: int = 200,
            warmup: int = 3, min_reps: int = 5) -> TimedMs:
    """Median milliseconds of ``fn()`` on ``device`` (do_bench on GPU, wall clock on CPU), with its spread.

    ``warmup`` and ``min_reps`` apply to the CPU clock (at least ``min_reps`` samples and
    ``min_time_s`` seconds, at most ``max_reps``).
    """
    return TimedMs(measure(fn, device, min_time_s=min_time_s, max_reps=max_reps, warmup=warmup, min_reps=min_reps))


def timed_samples(samples_ms: Sequence[float]) -> TimedMs:
    """The median and spread of samples a suite timed itself (e.g. the steps of a training loop)."""
    return TimedMs(Timing(tuple(float(s) for s in samples_ms)))


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to cycle through so that they overflow the L2 cache 4×."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return int(min(16, max(1, math.ceil(4 * l2 / max(bytes_per_set, 1)))))


def rotating(sets: Sequence[Any], fn: Callable[..., Any]) -> Callable[[], Any]:
    """A no-argument callable that runs ``fn(*s)`` on the next input set each call."""
    cycle = itertools.cycle(sets)
    return lambda: fn(*next(cycle))


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth, counting bytes read plus written."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul throughput (a large square product)."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


@dataclass
class Record:
    """One timed point: what ran, on what, how fast, and against which baseline."""

    suite: str
    op: str
    impl: str  # "sparsevit[<backend>]" or the baseline's name
    backend: Optional[str]
    baseline: Optional[str]
    dtype: str
    shape: dict
    median_ms: Optional[float]  # None when skipped
    bytes: Optional[int] = None
    flops: Optional[int] = None
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    frac_copy_bandwidth: Optional[float] = None
    floor_ms: Optional[float] = None  # the roofline floor max(flops / peak, bytes / bandwidth), an estimate
    frac_of_floor: Optional[float] = None  # floor_ms / median_ms: 1.0 is the roofline
    speedup_vs_baseline: Optional[float] = None
    max_abs_error: Optional[float] = None
    extra: dict = field(default_factory=dict)
    spread: Optional[dict] = None  # quartiles of the timing samples (filled by Runner.add)
    skipped: Optional[str] = None  # why this implementation could not run here


class Runner:
    """Collects records for one suite run and holds what the suites need."""

    def __init__(self, suite: str, device: torch.device, quick: bool, dtypes: Sequence[torch.dtype], backends: Sequence[str],
                 *, backends_explicit: bool = True):
        self.suite = suite
        self.device = device
        self.quick = quick
        self.dtypes = list(dtypes)
        self.backends = list(backends)
        # Requested by the user (every one gets a row, with the reason when it cannot run),
        # or the default for the device (an op without that backend just has no row).
        self.backends_explicit = backends_explicit
        self.env = environment(device)
        self.records: list[Record] = []
        self.peaks: dict[str, float] = {}

    def measure_peaks(self, matmul: bool = False) -> None:
        """Copy bandwidth (and optionally matmul peak) of this device, in this run."""
        self.peaks["copy_gbps"] = copy_bandwidth_gbps(self.device)
        if matmul:
            self.peaks["matmul_tflops_bf16"] = matmul_peak_tflops(self.device)

    def floor_ms(self, flops: Optional[float], nbytes: Optional[float], dtype: str = "bfloat16") -> Optional[float]:
        """The roofline floor in ms from this run's measured peaks, an analytic estimate:

        ``floor = max(flops / peak_flops, bytes / copy_bandwidth)``, with ``flops`` the work on
        nonzero blocks only and ``bytes`` the minimum traffic (each operand read once, the
        output written once).  The compute peak is the measured bf16 matmul rate (fp16 and
        fp32 records use it too: an optimistic floor for fp32).  None when neither the work
        nor a peak for it is known.
        """
        parts = []
        peak = self.peaks.get("matmul_tflops_bf16")
        if flops is not None and peak:
            parts.append(flops / (peak * 1e12))
        bandwidth = self.peaks.get("copy_gbps")
        if nbytes is not None and bandwidth:
            parts.append(nbytes / (bandwidth * 1e9))
        return 1e3 * max(parts) if parts else None

    def check(self, what: str, out: torch.Tensor, ref: torch.Tensor, atol: float = 0.0, rtol: float = 0.0) -> float:
        """Raise if ``out`` differs from ``ref``; return the max abs error."""
        try:
            torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        except AssertionError as exc:
            raise AssertionError(f"{self.suite}: {what} is wrong, refusing to time it:\n{exc}") from exc
        if out.numel() == 0:
            return 0.0
        return float((out.float() - ref.float()).abs().max())

    def split_backends(self, support: OpSupport, tensors: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None
                       ) -> tuple[list[str], dict[str, str]]:
        """(backends that run these inputs, {backend: why not} for the requested others).

        With the device's default backends, one that the op does not implement for this
        device type is left out; an explicitly requested one always gets its reason.
        """
        dtype = tensors[0].dtype if dtype is None else dtype
        ok, rejected = [], {}
        for backend in self.backends:
            own = support.backends.get(backend)
            if not self.backends_explicit and (own is None or self.device.type not in own.devices):
                continue
            reason = support.reject_reason(backend, tensors, dtype, self.device.type)
            if reason is None:
                ok.append(backend)
            else:
                rejected[backend] = reason
        return ok, rejected

    def skip(self, op: str, impl: str, backend: Optional[str], dtype: str, shape: dict, reason: str,
             baseline: Optional[str] = None) -> Record:
        """Keep a row for an implementation that cannot run here, with the reason."""
        return self.add(Record(self.suite, op, impl, backend, baseline, dtype, shape, None, skipped=reason))

    def add(self, record: Record) -> Record:
        """Fill the derived figures of ``record`` (and its spread, from a :class:`TimedMs`) and keep it."""
        if record.median_ms is None:
            self.records.append(record)
            return record
        timing = getattr(record.median_ms, "timing", None)
        if timing is not None:
            record.spread = {k: v for k, v in timing.as_dict().items() if k != "samples_ms"}
        record.median_ms = float(record.median_ms)
        seconds = record.median_ms * 1e-3
        if record.bytes is not None and seconds > 0:
            record.gbps = record.bytes / seconds / 1e9
            if "copy_gbps" in self.peaks:
                record.frac_copy_bandwidth = record.gbps / self.peaks["copy_gbps"]
        if record.flops is not None and seconds > 0:
            record.tflops = record.flops / seconds / 1e12
        floor = self.floor_ms(record.flops, record.bytes, record.dtype)
        if floor is not None and seconds > 0:
            record.floor_ms = floor
            record.frac_of_floor = floor / record.median_ms
        self.records.append(record)
        return record

    def to_json(self) -> dict:
        return {
            "suite": self.suite,
            "quick": self.quick,
            "environment": self.env,
            "peaks": self.peaks,
            "timing": "triton.testing.do_bench median" if self.device.type == "cuda" else "wall-clock median after warm-up",
            "records": [asdict(r) for r in self.records],
        }


def spread_cell(record: Record) -> str:
    """``IQR / median`` in percent, marked ``!`` above :data:`NOISY_SPREAD` (empty without samples)."""
    if record.spread is None:
        return ""
    rel = record.spread["rel_iqr"]
    return f"{100 * rel:.0f}%" + (" !" if rel > NOISY_SPREAD else "")


def spread_warning(records: Sequence[Record]) -> Optional[str]:
    """The warning for rows whose spread is too large to trust their ratios, or None."""
    noisy = [r for r in records if r.spread is not None and r.spread["rel_iqr"] > NOISY_SPREAD]
    if not noisy:
        return None
    return (f"warning: {len(noisy)} row(s) marked '!' have an interquartile range above {100 * NOISY_SPREAD:.0f}% "
            "of their median (a busy machine, or too few samples): their ratios are noise-prone; rerun before "
            "quoting them.")


def format_table(records: Sequence[Record]) -> str:
    """A fixed-width text table of the records: medians with their spread, skipped rows with
    their reason, an accuracy column when the records have one, and the spread warning."""
    header = ["op", "shape", "dtype", "impl", "ms", "IQR", "GB/s", "%copy", "TFLOP/s", "%floor", "vs baseline"]
    metrics = [(key, title) for key, title in (("top1", "top-1"), ("accuracy", "accuracy"))
               if any(key in r.extra for r in records)]
    header += [title for _, title in metrics]
    rows = [header]
    for r in records:
        shape = "x".join(f"{v}" for v in r.shape.values())
        if r.skipped is not None:
            rows.append([r.op, shape, r.dtype, r.impl, "skipped", r.skipped] + [""] * (len(header) - 6))
            continue
        rows.append([
            r.op,
            shape,
            r.dtype,
            r.impl,
            f"{r.median_ms:.4f}",
            spread_cell(r),
            "" if r.gbps is None else f"{r.gbps:.1f}",
            "" if r.frac_copy_bandwidth is None else f"{100 * r.frac_copy_bandwidth:.0f}%",
            "" if r.tflops is None else f"{r.tflops:.2f}",
            "" if r.frac_of_floor is None else f"{100 * r.frac_of_floor:.0f}%",
            "" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x {r.baseline}",
        ] + [f"{100 * r.extra[key]:.1f}%" if key in r.extra else "" for key, _ in metrics])
    # A skip reason spans the columns after it, so it does not widen them.
    widths = [max(len(row[i]) for row in rows if not (row[4] == "skipped" and i >= 5)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    warning = spread_warning(records)
    return "\n".join(lines + ([warning] if warning else []))


def progress(items: Iterable[T], desc: str, label: Optional[Callable[[T], str]] = None) -> Iterator[T]:
    """Yield ``items`` with one progress line (case, elapsed, ETA) on stderr after each."""
    return _progress(items, desc, label)
