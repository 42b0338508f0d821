"""Test set-up shared by every test.

Without CUDA, Triton kernels run in the Triton interpreter: ``TRITON_INTERPRET=1``
must be set before Triton is first imported, which is why it happens here, at
collection time, before any test module imports sparsevit's kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sparsevit  # noqa: E402
from sparsevit.backend import BACKENDS, choose_backend  # noqa: E402,F401

CUDA = torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose backends explicitly; an ambient SPARSEVIT_BACKEND must not leak in."""
    monkeypatch.delenv("SPARSEVIT_BACKEND", raising=False)
    torch.manual_seed(0)
