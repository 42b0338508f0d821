"""A missing or broken sparsevit._C is a warning and a reason, never an ImportError."""

from __future__ import annotations

import importlib

import pytest

from sparsevit import _extension


def test_broken_extension_warns_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: object())

    def broken(name: str):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(_extension.importlib, "import_module", broken)
    with pytest.warns(_extension.SparseVitExtensionWarning, match="failed to load: ImportError: undefined symbol"):
        reason = _extension._load()
    assert reason.startswith("sparsevit._C failed to load")


def test_missing_extension_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(_extension.torch.cuda, "is_available", lambda: False)
    reason = _extension._load()
    assert "not built" in reason and "SPARSEVIT_BUILD_CUDA=1" in reason
    monkeypatch.setattr(_extension.torch.cuda, "is_available", lambda: True)
    with pytest.warns(_extension.SparseVitExtensionWarning, match="not built"):
        _extension._load()


def test_loaded_state_matches_import() -> None:
    try:
        importlib.import_module("sparsevit._C")
        loads = True
    except ImportError:
        loads = False
    assert _extension.extension_loaded() == loads
