"""The sparse_training accuracy suite end to end, with a few steps per training (the real run takes minutes)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("sklearn")

import run  # noqa: E402
from suites import sparse_training  # noqa: E402


def test_sparse_training_quick(tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_training, "STEPS_QUICK", 4)
    out = tmp_path / "st.json"
    assert run.main(["--suite", "sparse_training", "--quick", "--out", str(out), "--device", "cpu", "--no-plot"]) == 0
    data = json.loads(out.read_text())
    impls = {(r["op"], r["impl"]) for r in data["records"]}
    assert {("dst_digits", m) for m in ("dense", "static", "SET", "RigL")} <= impls
    assert {("lottery_digits", "IMP-rewind"), ("lottery_digits", "random-reinit")} <= impls
    assert {("supermask_digits", "edge-popup"), ("supermask_digits", "random-untrained")} <= impls
    for r in data["records"]:
        assert 0.0 <= r["extra"]["accuracy"] <= 1.0
        if r["op"] == "dst_digits" and r["impl"] != "dense":
            assert r["extra"]["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert "| dst_digits | RigL |" in capsys.readouterr().out
