"""The kernel report refuses a kernel that has no spec: exit status 2 and a message naming it and the spec file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import sys
import triton
import triton.language as tl
import sparsevit.kernels.token_gather as module


@triton.jit
def _unspecified_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


_unspecified_kernel.__module__ = module.__name__
module._unspecified_kernel = _unspecified_kernel
from sparsevit.kernel_report.__main__ import main

sys.exit(main(["--kernels", "token_gather", "--table", "none", "--cuda", "none"]))
'''


def test_kernel_without_spec_fails_loudly(tmp_path) -> None:
    script = tmp_path / "add_kernel.py"  # @triton.jit needs its source in a file
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "kernel(s) without a spec: _unspecified_kernel" in done.stderr, done.stderr
    assert "specs_token_gather.py" in done.stderr
