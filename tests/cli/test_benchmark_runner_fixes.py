"""benchmarks/run.py: rows that cannot run keep their reason, a missing device is one line, every
suite writes its PNG or says why, spread in every table, progress lines, the sparse_training table."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import pytest
import torch

import sparsevit.backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402
import plot  # noqa: E402
import run  # noqa: E402
from suites import blocksparse, digits, sparse_training  # noqa: E402
from suites import tokens as tokens_suite  # noqa: E402


def _time_once(fn, device, **kwargs) -> harness.TimedMs:
    """Three timed calls: these tests check the plumbing, not the speed."""
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return harness.timed_samples(samples)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "copy_bandwidth_gbps", lambda device: 10.0)
    monkeypatch.setattr(harness, "matmul_peak_tflops", lambda device, dtype=None: 1.0)
    for suite in (tokens_suite, blocksparse):
        monkeypatch.setattr(suite, "time_ms", _time_once)


def test_device_not_there_is_one_line(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.main(["--suite", "tokens", "--quick", "--out", str(tmp_path / "t.json"), "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: error: --device cuda: no CUDA device here")
    assert "Traceback" not in captured.err and not (tmp_path / "t.json").exists()


def test_a_backend_that_cannot_run_keeps_its_row(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture, fast) -> None:
    monkeypatch.setattr(sparsevit.backend, "triton_interpreter_enabled", lambda: False)  # a CPU box without it
    out = tmp_path / "tokens.json"
    assert run.main(["--suite", "tokens", "--quick", "--out", str(out), "--device", "cpu", "--backend", "triton",
                     "--backend", "torch", "--no-plot"]) == 0
    records = json.loads(out.read_text())["records"]
    triton = [r for r in records if r["backend"] == "triton"]
    assert {r["op"] for r in triton} == {"gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens"}
    for r in triton:
        assert r["median_ms"] is None and "TRITON_INTERPRET=1" in r["skipped"]
    assert all(r["median_ms"] > 0 for r in records if r["skipped"] is None)
    text = capsys.readouterr().out
    # The ms column is as wide as its widest time, so the gap after "skipped" varies.
    assert "sparsevit[triton]" in text and re.search(r"skipped +needs CUDA tensors", text)


def test_default_backends_on_cpu_include_cpp(tmp_path, fast) -> None:
    out = tmp_path / "bs.json"
    assert run.main(["--suite", "blocksparse", "--quick", "--out", str(out), "--device", "cpu", "--no-plot"]) == 0
    records = json.loads(out.read_text())["records"]
    backends = {r["backend"] for r in records if r["backend"] is not None}
    assert backends == {"cpp", "torch"}  # cpp timed, or (extension not built) a row with the reason
    # timed rows carry their spread
    assert all(r["spread"]["n"] == 3 for r in records if r["skipped"] is None)


def test_blocksparse_png_is_speedup_vs_sparsity(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture, fast) -> None:
    drawn = []
    monkeypatch.setattr(blocksparse, "plot", lambda result, path: drawn.append(path) or blocksparse.plot_speedup(result, path))
    out = tmp_path / "bs.json"
    assert run.main(["--suite", "blocksparse", "--quick", "--out", str(out), "--device", "cpu", "--backend", "torch"]) == 0
    assert drawn == [str(tmp_path / "bs.png")] and os.path.getsize(drawn[0]) > 0
    assert f"wrote {drawn[0]}" in capsys.readouterr().out


def _record(op="op", impl="impl", median=1.0, **kw) -> dict:
    base = dict(suite="demo", op=op, impl=impl, backend=None, baseline=None, dtype="float32", shape={"N": 4},
                median_ms=median, bytes=None, flops=None, gbps=None, tflops=None, frac_copy_bandwidth=None,
                speedup_vs_baseline=None, max_abs_error=None, extra={}, spread=None, skipped=None)
    base.update(kw)
    return base


def _result(records: list[dict], suite: str = "demo") -> dict:
    return {"suite": suite, "environment": {"device_name": "cpu", "torch": torch.__version__}, "peaks": {},
            "records": records}


def test_every_plot_writes_a_png_or_says_why(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    speed = [_record(), _record(impl="ours", median=0.5, baseline="impl", speedup_vs_baseline=2.0),
             _record(impl="sparsevit[triton]", median=None, skipped="needs CUDA tensors")]
    assert os.path.exists(plot.plot_suite(_result(speed), str(tmp_path / "speed.png")))
    gbps = [_record(gbps=5.0), _record(impl="ours", gbps=9.0)]
    assert os.path.exists(plot.plot_suite(_result(gbps), str(tmp_path / "gbps.png")))
    with pytest.raises(plot.NoPlot, match="no record has a speed-up"):
        plot.plot_suite(_result([_record()]), str(tmp_path / "none.png"))
    bs = [_record(op="linear_fwd", impl="sparsevit[cpp]", shape={"M": 8, "K": 64, "N": 64, "block": 32, "sparsity": s},
                  speedup_vs_baseline=1.0 + s, extra={"ideal_speedup": 1 / (1 - s)}, suite="blocksparse")
          for s in (0.5, 0.9)]
    assert os.path.exists(blocksparse.plot_speedup(_result(bs, "blocksparse"), str(tmp_path / "bs.png")))
    dg = [_record(op="dense", extra={"top1": 0.9, "img_per_s": 100.0}), _record(op="dynamicvit", extra={"top1": 0.8, "img_per_s": 150.0})]
    assert os.path.exists(digits.plot(_result(dg, "digits"), str(tmp_path / "digits.png")))
    st = [_record(op="dst_digits", impl=m, extra={"accuracy": 0.9, "sparsity": 0.9}) for m in ("dense", "RigL")]
    assert os.path.exists(sparse_training.plot(_result(st, "sparse_training"), str(tmp_path / "st.png")))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(plot.NoPlot, match="matplotlib is not installed"):
        plot.plot_suite(_result(speed), str(tmp_path / "again.png"))


def test_table_has_spread_and_warns_when_large() -> None:
    runner = harness.Runner("demo", torch.device("cpu"), True, [torch.float32], ["torch"])
    runner.add(harness.Record("demo", "op", "steady", None, None, "float32", {"N": 4}, harness.timed_samples([10, 10.1, 9.9, 10])))
    table = harness.format_table(runner.records)
    assert "IQR" in table and "warning" not in table
    runner.add(harness.Record("demo", "op", "noisy", None, None, "float32", {"N": 4}, harness.timed_samples([1, 2, 3, 10])))
    runner.skip("op", "sparsevit[cuda]", "cuda", "float32", {"N": 4}, "needs CUDA tensors")
    table = harness.format_table(runner.records)
    assert "warning: 1 row(s) marked '!'" in table
    assert "sparsevit[cuda]" in table and "skipped  needs CUDA tensors" in table
    record = runner.records[0]
    assert record.spread["n"] == 4 and isinstance(record.median_ms, float) and not isinstance(record.median_ms, harness.TimedMs)
    assert json.dumps(runner.to_json())  # the spread goes into the JSON


def test_split_backends_default_vs_explicit() -> None:
    from sparsevit.ops.token_gather import TOKEN_SUPPORT

    x, index = torch.zeros(1, 4, 8), torch.zeros(1, 2, dtype=torch.long)
    default = harness.Runner("demo", torch.device("cpu"), True, [torch.float32], ["cpp", "torch"], backends_explicit=False)
    assert default.split_backends(TOKEN_SUPPORT, [x, index]) == (["torch"], {})  # tokens have no cpp kernels
    explicit = harness.Runner("demo", torch.device("cpu"), True, [torch.float32], ["cpp", "torch"])
    ok, rejected = explicit.split_backends(TOKEN_SUPPORT, [x, index])
    assert ok == ["torch"] and rejected == {"cpp": "token_gather has no cpp implementation"}


def test_sparse_training_prints_one_table_with_spread(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.setattr(sparse_training, "STEPS_QUICK", 3)
    out = tmp_path / "st.json"
    assert run.main(["--suite", "sparse_training", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("| experiment | method |") == 1
    assert "op  shape" not in captured.out  # no second, generic table without the accuracy column
    assert "| ms/step | IQR |" in captured.out
    # progress goes to stderr, one complete line per trained model, so it cannot run into the table
    progress = [line for line in captured.err.splitlines() if line.startswith("sparse_training [")]
    assert len(progress) == 1 + 6 + 5 + 1 and progress[-1].endswith("done")
    assert "sparse_training [" not in captured.out
    assert os.path.exists(tmp_path / "st.png")
    records = json.loads(out.read_text())["records"]
    assert all(r["spread"] is not None and r["spread"]["n"] == 3 for r in records if r["median_ms"])


def test_digits_progress_per_case(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.setattr(digits, "QUICK", digits.Config(canvas=16, scale=1, patch=8, embed_dim=16, depth=2, heads=1,
                                                       epochs=1, finetune_epochs=1, ticket_keep=0.25, seeds=(0,)))
    out = tmp_path / "digits.json"
    assert run.main(["--suite", "digits", "--quick", "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("digits [")]
    assert len(lines) == 10 and "ETA" in lines[0] and lines[-1].endswith("done")  # 5 models × 2 variants
    assert "top-1" in captured.out and os.path.exists(tmp_path / "digits.png")
    records = json.loads(out.read_text())["records"]
    for variant in ("scattered", "cluttered"):
        ops = {r["op"] for r in records if r["shape"]["variant"] == variant}
        assert {"dense", "dynamicvit rho=0.7", "dynamicvit rho=0.5"} <= ops, (variant, ops)
