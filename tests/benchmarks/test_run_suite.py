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
