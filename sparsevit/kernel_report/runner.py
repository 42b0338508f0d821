"""Run compile jobs in worker processes (spawned, with ``TRITON_INTERPRET`` removed: a kernel
module imported under the interpreter has no compiled kernels)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Sequence

from .triton_compile import compile_job
from .triton_specs import CompileJob

__all__ = ["run_jobs", "clean_environment"]


def clean_environment() -> None:
    """Remove ``TRITON_INTERPRET`` from this process's environment (workers inherit it)."""
    os.environ.pop("TRITON_INTERPRET", None)


def _init_worker() -> None:
    clean_environment()


def run_jobs(jobs: Sequence[CompileJob], workers: int, progress: bool = True) -> list[dict]:
    """Compile every job on ``workers`` processes; the records in the jobs' order."""
    clean_environment()
    if not jobs:
        return []
    results: list = [None] * len(jobs)
    start = time.perf_counter()
    step = max(1, len(jobs) // 20)
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_init_worker)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        futures = {pool.submit(compile_job, job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress and (done % step == 0 or done == len(jobs)):
                print(f"  compiled {done}/{len(jobs)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    except BaseException:
        # interrupted: stop the workers now rather than after the queued compiles
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    return results


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
