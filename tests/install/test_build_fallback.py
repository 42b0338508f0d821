"""An automatic-mode install never fails because the optional extension did not build.

A CUDA toolkit whose ``nvcc`` cannot compile or link (a common broken set-up) is
faked, and a wheel is built from a copy of the source tree: the build must
succeed, say in one message why the extension is missing and how to force or skip
it, and ship no ``sparsevit._C``.  With ``SPARSEVIT_BUILD_CUDA=1`` the same
toolkit must fail the build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                "bench-out", "gpu-out", ".pytest_cache", "results")


def _fake_toolkit(tmp: Path) -> Path:
    bin_dir = tmp / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvlink fatal: cannot find -lcudart' >&2\nexit 1\n")
    nvcc.chmod(0o755)
    return tmp / "cuda"


def _build_wheel(tmp: Path, mode: str) -> subprocess.CompletedProcess:
    pytest.importorskip("torch.utils.cpp_extension")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    env = dict(os.environ, CUDA_HOME=str(_fake_toolkit(tmp)), TORCH_CUDA_ARCH_LIST="9.0")
    env.pop("SPARSEVIT_BUILD_CUDA", None)
    if mode:
        env["SPARSEVIT_BUILD_CUDA"] = mode
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
           "-w", str(tmp / "wheels"), str(src)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_failed_build_in_auto_mode_installs_without_extension(tmp_path: Path) -> None:
    if __import__("torch").version.cuda is None:
        pytest.skip("a CPU build of torch never attempts the CUDA build: nothing to fall back from")
    result = _build_wheel(tmp_path, "")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "failed to build" in log and "SPARSEVIT_BUILD_CUDA=0" in log and "SPARSEVIT_BUILD_CUDA=1" in log
    (wheel,) = (tmp_path / "wheels").glob("sparsevit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsevit/__init__.py" in names and "sparsevit/kernels/masked_attention.py" in names
    assert not [n for n in names if n.startswith("sparsevit/_C")]


def test_failed_build_in_force_mode_fails(tmp_path: Path) -> None:
    if __import__("torch").version.cuda is None:
        pytest.skip("a CPU build of torch refuses SPARSEVIT_BUILD_CUDA=1 before compiling")
    result = _build_wheel(tmp_path, "1")
    assert result.returncode != 0
