"""``import sparsevit`` does not import timm (about 4 s) until an integration needs it."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_import_sparsevit_does_not_import_timm() -> None:
    mods = _modules_after("import sparsevit, sparsevit.nn, sparsevit.sparse_training")
    assert "sparsevit" in mods and "sparsevit.nn" in mods
    assert not {m for m in mods if m == "timm" or m.startswith("timm.")}


def test_masked_attention_imports_timm_on_first_use() -> None:
    mods = _modules_after("from sparsevit.nn import MaskedAttention\nassert MaskedAttention.__module__ == 'sparsevit.nn.masked_attention'")
    assert "timm" in mods


def test_unknown_attribute_is_an_attribute_error() -> None:
    import pytest

    import sparsevit.nn

    with pytest.raises(AttributeError, match="NoSuchLayer"):
        sparsevit.nn.NoSuchLayer  # noqa: B018
    assert "MaskedAttention" in dir(sparsevit.nn)
