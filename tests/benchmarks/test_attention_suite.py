"""The ``attention`` benchmark suite end to end on this device (tiny shapes on the CPU)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402
import run  # noqa: E402
from suites import attention as suite  # noqa: E402


def _time_once(fn, device, **kwargs) -> float:
    """One timed call: this test checks the plumbing, not the speed."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def test_attention_quick(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 10.0)  # keep the test fast
    monkeypatch.setattr(suite, "time_ms", _time_once)
    out = tmp_path / "attention.json"
    args = ["--suite", "attention", "--quick", "--out", str(out), "--device", "cpu", "--no-plot",
            "--backend", "torch", "--backend", "triton"]
    assert run.main(args) == 0
    records = json.loads(out.read_text())["records"]
    impls = {(r["op"], r["impl"]) for r in records}
    for mode in ("fwd", "fwd+bwd"):
        for impl in ("sdpa(no mask)", "sparsevit[torch]", "sparsevit[triton]", "dynamicvit_unfused"):
            assert (f"attention[{mode}]", impl) in impls
            assert (f"masked_attention[{mode}]", impl) in impls
        assert (f"masked_attention[{mode}]", "sdpa+bool_mask") in impls
    for r in records:
        assert r["median_ms"] > 0 and r["tflops"] > 0
        if r["baseline"] is not None:
            assert r["speedup_vs_baseline"] > 0 and r["max_abs_error"] is not None
