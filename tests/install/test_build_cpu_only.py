"""Without CUDA, an install still builds the C++ CPU kernels; SPARSEVIT_BUILD_EXT=0 builds nothing.

A wheel is built from a copy of the source tree with ``SPARSEVIT_BUILD_CUDA=0`` and no
CUDA toolkit in sight: it must ship ``sparsevit._C``, and that extension, imported from
the unpacked wheel in a fresh interpreter, must carry the ``cpp`` kernels (and no CUDA
ones) and compute a product.
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

CHECK = """
import torch, sparsevit
from sparsevit._extension import CPU_KERNELS_ERROR, CUDA_KERNELS_ERROR
assert sparsevit._C.__file__.startswith({where!r}), sparsevit._C.__file__
assert CPU_KERNELS_ERROR is None, CPU_KERNELS_ERROR
assert CUDA_KERNELS_ERROR is not None and "without the CUDA kernels" in CUDA_KERNELS_ERROR
w = sparsevit.BlockSparseMatrix.from_dense(torch.randn(64, 32), block_size=16, sparsity=0.5)
x = torch.randn(5, 32)
torch.testing.assert_close(sparsevit.dds(x, w.t(), backend="cpp"), x @ w.to_dense().t())
print("cpp ok")
"""


def _build_wheel(tmp: Path, env_extra: dict) -> tuple[subprocess.CompletedProcess, Path]:
    pytest.importorskip("torch.utils.cpp_extension")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARSEVIT_BUILD")}
    env.update(env_extra, MAX_JOBS="2")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v",
           "-w", str(tmp / "wheels"), str(src)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900), tmp / "wheels"


def test_cpu_only_build_ships_working_cpu_kernels(tmp_path: Path) -> None:
    result, wheels = _build_wheel(tmp_path, {"SPARSEVIT_BUILD_CUDA": "0", "CUDA_HOME": str(tmp_path / "no-cuda")})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "building the C++ CPU kernels only (SPARSEVIT_BUILD_CUDA=0)" in log
    (wheel,) = wheels.glob("sparsevit-*.whl")
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    assert list((unpacked / "sparsevit").glob("_C*.so")), "the wheel ships no sparsevit._C"
    env = dict(os.environ, PYTHONPATH=str(unpacked))
    run = subprocess.run([sys.executable, "-c", CHECK.format(where=str(unpacked))], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "cpp ok" in run.stdout, run.stdout + run.stderr


def test_build_ext_0_builds_nothing(tmp_path: Path) -> None:
    result, wheels = _build_wheel(tmp_path, {"SPARSEVIT_BUILD_EXT": "0"})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "SPARSEVIT_BUILD_EXT=0, not building" in log
    (wheel,) = wheels.glob("sparsevit-*.whl")
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("sparsevit/_C")]


def test_contradictory_settings_fail(tmp_path: Path) -> None:
    result, _ = _build_wheel(tmp_path, {"SPARSEVIT_BUILD_EXT": "0", "SPARSEVIT_BUILD_CUDA": "1"})
    assert result.returncode != 0
    assert "contradict" in result.stdout + result.stderr
