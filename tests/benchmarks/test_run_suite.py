"""The benchmark runner end to end on this device: correctness gate, records, table, JSON."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402
import run  # noqa: E402


def test_tokens_quick(tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 10.0)  # keep the test fast
    out = tmp_path / "tokens.json"
    assert run.main(["--suite", "tokens", "--quick", "--out", str(out), "--device", "cpu", "--backend", "torch", "--backend", "triton"]) == 0
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__
    ops = {r["op"] for r in data["records"]}
    assert ops == {"gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens"}
    ours = [r for r in data["records"] if r["backend"] is not None]
    assert {r["backend"] for r in ours} == {"torch", "triton"}
    for r in ours:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["speedup_vs_baseline"] > 0
        assert r["frac_copy_bandwidth"] == pytest.approx(r["gbps"] / 10.0)
    assert "sparsevit[triton]" in capsys.readouterr().out


def test_check_refuses_wrong_results() -> None:
    runner = harness.Runner("demo", torch.device("cpu"), True, [torch.float32], ["torch"])
    with pytest.raises(AssertionError, match="refusing to time it"):
        runner.check("demo op", torch.ones(3), torch.zeros(3))


def test_roofline_floor_in_every_record_with_work_and_peaks() -> None:
    runner = harness.Runner("demo", torch.device("cpu"), True, [torch.float32], ["torch"])
    runner.peaks.update(copy_gbps=100.0, matmul_tflops_bf16=2.0)
    # 4 GFLOP at 2 TFLOP/s = 2 ms; 100 MB at 100 GB/s = 1 ms: compute-bound, floor 2 ms.
    rec = runner.add(harness.Record("demo", "op", "impl", "torch", None, "bfloat16", {"N": 1}, 8.0,
                                    bytes=100_000_000, flops=4_000_000_000))
    assert rec.floor_ms == pytest.approx(2.0) and rec.frac_of_floor == pytest.approx(0.25)
    # Memory-bound: 1 GFLOP (0.5 ms) against 300 MB (3 ms).
    rec = runner.add(harness.Record("demo", "op", "impl", "torch", None, "bfloat16", {"N": 2}, 6.0,
                                    bytes=300_000_000, flops=1_000_000_000))
    assert rec.floor_ms == pytest.approx(3.0) and rec.frac_of_floor == pytest.approx(0.5)
    assert runner.floor_ms(None, None) is None
    bare = harness.Runner("demo", torch.device("cpu"), True, [torch.float32], ["torch"])
    assert bare.add(harness.Record("demo", "op", "impl", None, None, "float32", {"N": 3}, 1.0, flops=10)).floor_ms is None
    table = harness.format_table(runner.records)
    assert "%floor" in table.splitlines()[0] and "25%" in table and "50%" in table
