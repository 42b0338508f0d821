"""The benchmark harness: environment, timing, device peaks, records, table, plot.

How we measure (see BENCHMARKING.md): every kernel is checked against its reference
on the very inputs it is timed on; GPU times are medians of
``triton.testing.do_bench`` (warm-up, L2 flushed between runs) with inputs rotated
so the L2 cache does not flatter; CPU times are wall-clock medians after warm-up.
Peaks (copy bandwidth, matmul throughput) are measured in the same run, so derived
fractions compare like with like.  Each result is one JSON record.
"""

from __future__ import annotations

import itertools
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["Record", "Runner", "environment", "time_ms", "copy_bandwidth_gbps", "matmul_peak_tflops"]


def environment(device: torch.device) -> dict:
    """Device name and library versions for every record."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    try:
        import timm

        timm_version = timm.__version__
    except Exception:  # noqa: BLE001
        timm_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        name = f"CPU {name} ({torch.get_num_threads()} threads)"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "timm": timm_version,
        "python": platform.python_version(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, *, min_time_s: float = 0.2, max_reps: int = 200) -> float:
    """Median milliseconds of ``fn()`` on ``device`` (do_bench on GPU, wall clock on CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(3):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_time_s and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


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
    median_ms: float
    bytes: Optional[int] = None
    flops: Optional[int] = None
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    frac_copy_bandwidth: Optional[float] = None
    speedup_vs_baseline: Optional[float] = None
    max_abs_error: Optional[float] = None
    extra: dict = field(default_factory=dict)


class Runner:
    """Collects records for one suite run and holds what the suites need."""

    def __init__(self, suite: str, device: torch.device, quick: bool, dtypes: Sequence[torch.dtype], backends: Sequence[str]):
        self.suite = suite
        self.device = device
        self.quick = quick
        self.dtypes = list(dtypes)
        self.backends = list(backends)
        self.env = environment(device)
        self.records: list[Record] = []
        self.peaks: dict[str, float] = {}

    def measure_peaks(self, matmul: bool = False) -> None:
        """Copy bandwidth (and optionally matmul peak) of this device, in this run."""
        self.peaks["copy_gbps"] = copy_bandwidth_gbps(self.device)
        if matmul:
            self.peaks["matmul_tflops_bf16"] = matmul_peak_tflops(self.device)

    def check(self, what: str, out: torch.Tensor, ref: torch.Tensor, atol: float = 0.0, rtol: float = 0.0) -> float:
        """Raise if ``out`` differs from ``ref``; return the max abs error."""
        try:
            torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        except AssertionError as exc:
            raise AssertionError(f"{self.suite}: {what} is wrong, refusing to time it:\n{exc}") from exc
        if out.numel() == 0:
            return 0.0
        return float((out.float() - ref.float()).abs().max())

    def add(self, record: Record) -> Record:
        """Fill the derived figures of ``record`` and keep it."""
        seconds = record.median_ms * 1e-3
        if record.bytes is not None and seconds > 0:
            record.gbps = record.bytes / seconds / 1e9
            if "copy_gbps" in self.peaks:
                record.frac_copy_bandwidth = record.gbps / self.peaks["copy_gbps"]
        if record.flops is not None and seconds > 0:
            record.tflops = record.flops / seconds / 1e12
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


def format_table(records: Sequence[Record]) -> str:
    """A fixed-width text table of the records."""
    header = ["op", "shape", "dtype", "impl", "ms", "GB/s", "%copy", "TFLOP/s", "vs baseline"]
    rows = [header]
    for r in records:
        shape = "x".join(f"{v}" for v in r.shape.values())
        rows.append([
            r.op,
            shape,
            r.dtype,
            r.impl,
            f"{r.median_ms:.4f}",
            "" if r.gbps is None else f"{r.gbps:.1f}",
            "" if r.frac_copy_bandwidth is None else f"{100 * r.frac_copy_bandwidth:.0f}%",
            "" if r.tflops is None else f"{r.tflops:.1f}",
            "" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x {r.baseline}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress(items: Sequence[Any], desc: str):
    """A tqdm progress bar when tqdm is installed, else the plain sequence."""
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False)
    except ImportError:
        return items
