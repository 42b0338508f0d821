"""``python -m sparsevit bench`` at a tiny size: table, JSON, PNG, the skipped GPU row, the correctness gate."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from sparsevit.cli import bench_cases, main
from sparsevit.cli.timing import Timing


def _result(out_dir) -> dict:
    (path,) = glob.glob(os.path.join(str(out_dir), "bench-cpu-*.json"))
    return json.loads(open(path, encoding="utf-8").read())


def test_bench_tiny(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    result = _result(tmp_path)
    rows = {(r["part"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {("dense ViT", "inference"), ("block-sparse MLP", "inference"), ("DynamicViT", "inference"),
                         ("dense ViT", "train step"), ("block-sparse MLP", "train step"),
                         ("masked attention", "fwd, fwd+bwd")}
    for key in (("block-sparse MLP", "inference"), ("DynamicViT", "inference"), ("block-sparse MLP", "train step")):
        r = rows[key]
        assert r["check"]["ok"] and r["speedup"] > 0 and r["img_per_s"] > 0
        lo, hi = r["speedup_range"]
        assert lo <= r["speedup"] <= hi
        assert r["timing"]["n"] >= 2 and r["timing"]["q1_ms"] <= r["timing"]["median_ms"] <= r["timing"]["q3_ms"]
    assert rows[("block-sparse MLP", "inference")]["extra"]["converted"] == [
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    # On the CPU the fused attention is a row saying why it is not timed.
    assert "GPU only" in rows[("masked attention", "fwd, fwd+bwd")]["skipped"]
    out = captured.out
    assert "median ms" in out and "IQR/median" in out and "vs dense" in out and "GPU only" in out
    assert "no torch.compile" in out and "timm attention" in out
    assert os.path.exists(glob.glob(os.path.join(str(tmp_path), "bench-cpu-*.png"))[0])
    assert "bench [3/3]" in captured.err and "elapsed" in captured.err


def test_bench_refuses_to_time_a_wrong_model(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A sparse ViT that disagrees with its masked dense twin is not timed, and the run fails."""
    real = bench_cases.masked_dense

    def perturbed(model):
        twin = real(model)
        with torch.no_grad():
            w = twin.blocks[0].mlp.fc1.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))  # not a constant: LayerNorm cancels that
        return twin

    monkeypatch.setattr(bench_cases, "masked_dense", perturbed)
    assert main(["bench", "--device", "cpu", "--tiny", "--no-plot", "--out", str(tmp_path)]) == 1
    rows = {(r["part"], r["mode"]): r for r in _result(tmp_path)["rows"]}
    bad = rows[("block-sparse MLP", "inference")]
    assert not bad["check"]["ok"] and bad["timing"] is None and bad["skipped"].startswith("wrong result")
    assert rows[("DynamicViT", "inference")]["check"]["ok"]
    out = capsys.readouterr().out
    assert "CHECK FAILED" in out and "no PNG: --no-plot" in out


def test_noisy_rows_are_flagged() -> None:
    from sparsevit.cli.bench import render

    base = bench_cases.Row("dense ViT", "inference", "dense ViT", None, {"model": "m", "batch": 2, "dtype": "float32",
                                                                         "timm_attention": "SDPA"},
                           Timing((10.0, 10.0, 10.1, 9.9)), 2)
    ours = bench_cases.Row("DynamicViT", "inference", "DynamicViT rho=0.7", "dense ViT", base.setting,
                           Timing((4.0, 9.0, 12.0, 5.0)), 2)
    bench_cases._against([ours], base)
    env = {"device_name": "cpu", "torch": "t", "triton": "t", "cuda": None, "timm": "t"}
    text = render({"environment": env, "plan": {"sparsity": 0.9, "block": 64, "keep_ratio": 0.7},
                   "rows": [base.as_dict(), ours.as_dict()]})
    assert "warning: 1 row(s) marked '!'" in text and "(noise)" in text


def test_plans_fit_the_device() -> None:
    cpu_quick = bench_cases.plan_for(torch.device("cpu"), quick=True)
    assert cpu_quick.batch <= 16 and cpu_quick.dtype == torch.float32 and cpu_quick.sparsity == 0.9 and cpu_quick.block == 64
    gpu = bench_cases.plan_for(torch.device("cuda"), quick=False)
    assert gpu.dtype == torch.bfloat16 and gpu.attention and gpu.infer_rounds >= 40


def test_attention_part_logic_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU-only part (c), run through the Triton interpreter: checked, timed, compared with SDPA."""
    import io

    from sparsevit.backend import triton_interpreter_enabled
    from sparsevit.cli.progress import Progress

    assert triton_interpreter_enabled(), "tests/conftest.py sets TRITON_INTERPRET=1 on a CPU machine"
    monkeypatch.setattr(bench_cases, "attention_skip_reason", lambda device, dtype: None)
    plan = bench_cases.plan_for(torch.device("cpu"), quick=True, tiny=True)
    monkeypatch.setattr(bench_cases, "measure", lambda fn, device: Timing(tuple(_once(fn) for _ in range(3))))
    rows = bench_cases.run_attention(plan, torch.device("cpu"), Progress(2, "t", io.StringIO()))
    assert [(r.mode, r.impl) for r in rows] == [
        (mode, impl) for mode in ("fwd", "fwd+bwd")
        for impl in ("SDPA (dense, no mask)", "masked_attention (fused, triton)", "masked_attention (unfused, torch)")]
    for r in rows:
        assert r.skipped is None and r.tflops > 0
        if r.baseline is not None:
            assert r.check["ok"] and r.speedup > 0


def _once(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def test_attention_is_skipped_on_the_cpu_with_the_reason() -> None:
    reason = bench_cases.attention_skip_reason(torch.device("cpu"), torch.float32)
    assert reason.startswith("GPU only")
