"""Fixtures of the kernel-report tests: one run of the report on its CI subset, shared by the tests.

The test session runs Triton in interpreter mode when there is no GPU, and a kernel
module imported that way has no compiled kernels, so the report runs in a subprocess
with ``TRITON_INTERPRET`` removed from its environment.  Triton's cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``) makes a second run fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class ReportRun:
    """The report's JSON document, exit status, stderr and wall time."""

    doc: dict
    returncode: int
    stderr: str
    seconds: float


def run_report(args: list[str], json_path: Path, timeout: int = 1200) -> ReportRun:
    """``python -m sparsevit.kernel_report ARGS --json JSON_PATH`` in a clean subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sparsevit.kernel_report", *args, "--json", str(json_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if not json_path.exists():
        pytest.fail(f"the kernel report wrote no JSON (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return ReportRun(json.loads(json_path.read_text()), done.returncode, done.stderr, seconds)


@pytest.fixture(scope="session")
def ci_report(tmp_path_factory: pytest.TempPathFactory) -> ReportRun:
    """The Triton part of the report on the ``ci`` subset, for sm_80 and sm_90."""
    pytest.importorskip("triton")
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    path = tmp_path_factory.mktemp("kernel_report") / "ci.json"
    return run_report(["--subset", "ci", "--arch", "80,90", "-j", jobs, "--cuda", "none", "--table", "none"], path)
