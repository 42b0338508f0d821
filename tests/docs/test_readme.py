"""README.md is a tested document: every fenced Python block runs as written.

Each block is complete (its imports and inputs are in it) and runs on its own, in a
fresh namespace, in a temporary directory.  A block whose first line is
``# GPU only`` runs only on a CUDA device (``gpu`` marker); its CPU twin is another
block of the README, and there must be at least as many CPU blocks as GPU ones.
"""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
GPU_ONLY = "# GPU only"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def readme_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ```python block of ``text``."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == "python"]


def _params() -> list:
    with open(README, encoding="utf-8") as fh:
        blocks = readme_blocks(fh.read())
    return [pytest.param(code, id=f"README.md:{line}",
                         marks=[pytest.mark.gpu] if code.lstrip().startswith(GPU_ONLY) else [])
            for line, code in blocks]


def test_the_readme_has_its_blocks() -> None:
    params = _params()
    gpu = [p for p in params if p.marks]
    assert len(params) >= 6, "the README lost its examples"
    assert len(params) - len(gpu) >= len(gpu) >= 1
    first_cpu = next(p for p in params if not p.marks)
    assert "sparsevit.backends()" in first_cpu.values[0]  # the quick start comes first


def test_block_extraction() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n# GPU only\ny = 2\n```\n"
    assert readme_blocks(text) == [(3, "x = 1\n"), (9, "# GPU only\ny = 2\n")]


@pytest.mark.parametrize("code", _params())
def test_readme_block_runs(code: str, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, README, "exec"), namespace)  # noqa: S102 - the README's own code
    capsys.readouterr()
