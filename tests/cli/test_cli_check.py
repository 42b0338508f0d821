"""``python -m sparsevit check``: every op x backend x dtype against the reference, and it catches breakage."""

from __future__ import annotations

import json

import pytest
import torch

import sparsevit.backend
from sparsevit.backend import BACKENDS
from sparsevit.cli import check as check_cli
from sparsevit.cli import main
from sparsevit.cli.check_cases import CASES, OPS
from sparsevit.ops import block_sparse_matmul, token_gather
from helpers import require_backend


@pytest.fixture
def no_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton as on a CPU machine without TRITON_INTERPRET (and keeps these tests fast)."""
    monkeypatch.setattr(sparsevit.backend, "triton_interpreter_enabled", lambda: False)


def _records(path) -> list[dict]:
    return json.loads(path.read_text())["records"]


def test_check_passes_on_cpu(tmp_path, capsys: pytest.CaptureFixture, no_interpreter) -> None:
    require_backend("cpp")
    path = tmp_path / "check.json"
    assert main(["check", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    records = _records(path)
    keys = [(r["op"], r["backend"], r["dtype"]) for r in records]
    assert len(keys) == len(set(keys)) == len(OPS) * len(BACKENDS) * 3
    by = {k: r for k, r in zip(keys, records)}
    for op in OPS:
        for dtype in ("float32", "float16", "bfloat16"):
            torch_rec = by[(op, "torch", dtype)]
            assert torch_rec["status"] == "pass", torch_rec
            n_cases = sum(c.op == op for c in CASES)
            assert len(torch_rec["cases"]) == n_cases >= 2
            # forward and every input gradient were compared
            for case in torch_rec["cases"]:
                names = [c["name"] for c in case["checks"]]
                assert names[0] == "out" and len(names) >= 2 and all(n.startswith("d") for n in names[1:])
            want_cpp = "pass" if op in ("dds", "dsd", "sdd") else "unavailable"
            assert by[(op, "cpp", dtype)]["status"] == want_cpp
            # not silently dropped: shown, with the reason
            triton = by[(op, "triton", dtype)]
            assert triton["status"] == "unavailable" and triton["reason"]
            assert by[(op, "cuda", dtype)]["status"] == "unavailable"
    assert "triton (" in out and "TRITON_INTERPRET=1" in out
    assert f"{len(OPS) * 3 + 9} passed, 0 failed" in out  # torch everywhere, cpp for the three products


def test_check_fails_on_a_wrong_forward(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                        tmp_path, no_interpreter) -> None:
    real = token_gather.token_gather_torch.gather_tokens
    monkeypatch.setattr(token_gather.token_gather_torch, "gather_tokens", lambda x, index: real(x, index) + 1e-3)
    path = tmp_path / "check.json"
    code = main(["check", "--device", "cpu", "--backend", "torch", "--op", "gather_tokens", "--op", "scatter_tokens",
                 "--dtype", "float32", "--json", str(path)])
    assert code == 1
    status = {r["op"]: r["status"] for r in _records(path)}
    # scatter's gradient is a gather: broken too, found through its backward
    assert status == {"gather_tokens": "fail", "scatter_tokens": "fail"}
    captured = capsys.readouterr()
    assert "failures:" in captured.out and "gather_tokens[torch] float32" in captured.out
    assert "check FAILED" in captured.err


def test_check_fails_on_a_wrong_gradient(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Only sdd (the weight gradient of dds/dsd) is broken: the forward of dds is right."""
    require_backend("cpp")
    real = block_sparse_matmul._native

    def broken(name: str, backend: str):
        op = real(name, backend)
        return (lambda *a: op(*a) * 0.5) if name == "sdd" else op

    monkeypatch.setattr(block_sparse_matmul, "_native", broken)
    path = tmp_path / "check.json"
    assert main(["check", "--device", "cpu", "--backend", "cpp", "--backend", "torch", "--op", "dds",
                 "--dtype", "float32", "--json", str(path)]) == 1
    recs = {r["backend"]: r for r in _records(path)}
    assert recs["torch"]["status"] == "pass" and recs["cpp"]["status"] == "fail"
    case = recs["cpp"]["cases"][0]
    checks = {c["name"]: c["ok"] for c in case["checks"]}
    assert checks["out"] and checks["da"] and not checks["dvalues"]


def test_a_crash_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(token_gather.token_gather_torch, "scatter_add_tokens", boom)
    case = next(c for c in CASES if c.op == "scatter_add_tokens")
    result = check_cli.check_one(case, "torch", torch.device("cpu"), torch.float32)
    assert result["status"] == "fail" and result["problem"] == "RuntimeError: kernel exploded"


def test_check_device_not_there_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["check", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device here" in err and "--device cpu" in err
