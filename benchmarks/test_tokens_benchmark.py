"""The ``tokens`` suite through pytest-benchmark:

    pytest benchmarks/test_tokens_benchmark.py --benchmark-only

Wall-clock timings by pytest-benchmark (on GPU each call synchronises); the
authoritative figures come from ``benchmarks/run.py``, which uses do_bench.
"""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(256, 197, 384), (256, 197, 768)] if DEVICE.type == "cuda" else [(8, 197, 384)]
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = ["cuda", "triton", "torch"] if DEVICE.type == "cuda" else ["torch"]


def _synced(fn):
    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", BACKENDS + ["torch.gather"])
def test_gather(benchmark, shape: tuple, impl: str) -> None:
    b, n, c = shape
    x = torch.randn(b, n, c, device=DEVICE, dtype=DTYPE)
    index = reference.select_index(torch.randn(b, n - 1, device=DEVICE), int(0.7 * (n - 1)), 1, "position")
    if impl == "torch.gather":
        fn = lambda: x.gather(1, index.unsqueeze(-1).expand(-1, -1, c))  # noqa: E731
    else:
        fn = lambda: sparsevit.gather_tokens(x, index, check_index=False, backend=impl)  # noqa: E731
    out = benchmark(_synced(fn))
    torch.testing.assert_close(out, reference.gather_tokens(x, index), atol=0, rtol=0)
