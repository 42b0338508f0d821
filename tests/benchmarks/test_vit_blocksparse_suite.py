"""The model-level block-sparse suite end to end on a small timm ViT (the real run is ViT-S/16)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import run  # noqa: E402
from suites import vit_blocksparse  # noqa: E402


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = dict(model="test_vit", batch=2, train_batch=2, rounds=2, budget_s=0.0)
    monkeypatch.setattr(vit_blocksparse, "_plan", lambda runner: plan)


def test_every_contender_is_checked_and_timed(tmp_path, small, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "v.json"
    assert run.main(["--suite", "vit_blocksparse", "--quick", "--out", str(out), "--device", "cpu", "--no-plot"]) == 0
    records = json.loads(out.read_text())["records"]
    inference = [r for r in records if r["op"] == "inference"]
    train = [r for r in records if r["op"] == "train step"]
    # dense + 4 (sparsity, block) settings + DynamicViT + DynamicViT with sparse MLPs; training: dense + 4
    assert len(inference) == 7 and len(train) == 5
    for r in records:
        assert r["median_ms"] > 0 and r["spread"]["n"] == 2
        if r["impl"] != "dense ViT":
            assert r["baseline"] == "dense ViT" and r["speedup_vs_baseline"] > 0
            assert r["extra"]["max_rel_error"] <= 1e-3
    linears = [r for r in inference if r["impl"].startswith("all block Linears")]
    assert {(r["extra"]["sparsity"], r["extra"]["block"]) for r in linears} == set(vit_blocksparse.SETTINGS)
    # qkv, proj, fc1, fc2 of each of test_vit's 6 blocks
    assert all(r["extra"]["converted"] == 4 * 6 for r in linears)
    expected_backend = "cpp" if __import__("sparsevit").extension_loaded() else "torch"
    assert {r["backend"] for r in linears} == {expected_backend}
    assert "vs dense" in capsys.readouterr().out


def test_a_wrong_sparse_model_is_not_timed(tmp_path, small, monkeypatch: pytest.MonkeyPatch) -> None:
    real = vit_blocksparse._dense_twin

    def wrong_twin(model: torch.nn.Module) -> torch.nn.Module:
        twin = real(model)
        with torch.no_grad():
            twin.head.bias.add_(torch.linspace(-1.0, 1.0, twin.head.bias.numel()))
        return twin

    monkeypatch.setattr(vit_blocksparse, "_dense_twin", wrong_twin)
    with pytest.raises(AssertionError, match="refusing to time it"):
        run.main(["--suite", "vit_blocksparse", "--quick", "--out", str(tmp_path / "v.json"), "--device", "cpu", "--no-plot"])
    assert not (tmp_path / "v.json").exists()
