"""``python -m sparsevit info``: versions, devices, extension, and the backend of every op with reasons."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsevit.backend import BACKENDS
from sparsevit.cli import main
from sparsevit.cli import info as info_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_info_prints_backend_table_per_op(tmp_path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "info.json"
    assert main(["info", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    for heading in ("Versions", "Devices", "Extension sparsevit._C", "GPU architecture", "Backends"):
        assert heading in out
    assert "backend | cpu tensors | cuda tensors" in out  # sparsevit.backend_table()
    for op in info_cli.OP_FAMILIES:
        assert op in out
    data = json.loads(path.read_text())
    cpu_rows = [r for r in data["ops"] if r["device"] == "cpu"]
    assert len(cpu_rows) == 4  # token ops, block-sparse products, masked softmax, masked attention
    for row in cpu_rows:
        assert set(row["reasons"]) == set(BACKENDS)
        assert row["default"] in BACKENDS and row["reasons"][row["default"]] is None
        # every backend not used is either available or has a reason, printed under its op
        for backend, reason in row["reasons"].items():
            assert f"{backend:<7} {'available' if reason is None else reason}" in out
    assert data["versions"]["torch"]
    assert data["extension"]["file"] is None or os.path.exists(data["extension"]["file"])


def test_info_reports_the_environment_override(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SPARSEVIT_BACKEND", "torch")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "SPARSEVIT_BACKEND='torch' overrides the automatic choice" in out
    assert "dds, dsd, sdd  on cpu: default torch" in out


def test_python_dash_m_sparsevit_runs() -> None:
    """The installed entry point (``python -m sparsevit``), in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "sparsevit", "info"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Default backend per op" in proc.stdout
    # Without the interpreter, Triton on CPU tensors is shown with its reason, not left out.
    assert "triton  needs CUDA tensors, or TRITON_INTERPRET=1" in proc.stdout
