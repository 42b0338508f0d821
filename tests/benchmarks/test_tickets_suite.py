"""The tickets suite: its table over seeds from hand-made rows, and every part end to end with a few steps."""

from __future__ import annotations

import json
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

pytest.importorskip("sklearn")

import run  # noqa: E402
from suites import _tickets_multiview, _tickets_peekaboo, _tickets_rst, _tickets_universal, tickets  # noqa: E402


def _row(method: str, top1: float, setting: dict | None = None) -> dict:
    return {"experiment": "exp", "method": method, "setting": setting or {"sparsity": 0.5}, "top1": top1,
            "sparsity": 0.5, "train_s": 2.0, "flips": 3}


def test_table_groups_seeds_and_reports_mean_and_spread() -> None:
    records = [tickets.to_record(_row("a", t), seed) for seed, t in enumerate((0.5, 0.7, 0.9))]
    records.append(tickets.to_record(_row("b", 0.25), 0))
    records.append(tickets.to_record(_row("a", 0.1, {"sparsity": 0.8}), 0))
    groups = tickets.grouped(records)
    assert [len(v) for v in groups.values()] == [3, 1, 1]
    s = tickets.summary(next(iter(groups.values())))
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9]))
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.9, 3) and s["train_s"] == pytest.approx(2.0)
    table = tickets.tickets_table(records)
    assert "| exp | a | sparsity=0.5 | 70.0 ± 20.0 (50.0–90.0) | 3 | 50% | 2.0 |" in table
    assert "| exp | b | sparsity=0.5 | 25.0 ± 0.0 (25.0–25.0) | 1 |" in table
    assert records[0].shape == {"sparsity": 0.5, "seed": 0} and records[0].extra["flips"] == 3


def test_a_row_without_its_keys_is_refused() -> None:
    row = _row("a", 0.5)
    del row["top1"]
    with pytest.raises(ValueError, match="top1"):
        tickets.to_record(row, 0)


def test_tickets_quick_end_to_end(tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    for module, names in ((_tickets_universal, ("STEPS_QUICK", "HEAD_STEPS_QUICK")),
                          (_tickets_multiview, ("STEPS_QUICK",)),
                          (_tickets_peekaboo, ("STEPS_QUICK",)), (_tickets_rst, ("STEPS_QUICK",))):
        for name in names:
            monkeypatch.setattr(module, name, 5)
    monkeypatch.setattr(_tickets_multiview, "N_TRAIN_QUICK", 200)
    monkeypatch.setattr(_tickets_multiview, "N_TEST_QUICK", 100)
    monkeypatch.setattr(_tickets_peekaboo, "SCORES_QUICK", ("magnitude", "synflow"))
    out = tmp_path / "tickets.json"
    assert run.main(["--suite", "tickets", "--quick", "--out", str(out), "--device", "cpu", "--no-plot"]) == 0
    data = json.loads(out.read_text())
    seen = {(r["op"], r["impl"]) for r in data["records"]}
    assert {("peekaboo", "edge-popup"), ("peekaboo", "peekaboo-magnitude"), ("peekaboo", "peekaboo-synflow"),
            ("peekaboo", "peekaboo-magnitude@timm-init")} <= seen
    assert {("rst", "dense"), ("rst", "random-static"), ("rst", "rst")} <= seen
    assert {op for op, _ in seen} >= {"universal_tickets", "universal_source", "peekaboo", "rst"}
    for r in data["records"]:
        assert 0.0 <= r["extra"]["top1"] <= 1.0 and r["shape"]["seed"] == 0 and r["median_ms"] >= 0
        if r["op"] in ("peekaboo", "rst") and r["impl"] != "dense":
            assert r["extra"]["sparsity"] == pytest.approx(r["shape"]["sparsity"], abs=0.01)
    assert "| rst | rst |" in capsys.readouterr().out
