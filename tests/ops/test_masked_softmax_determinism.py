"""Under deterministic algorithms the masked-softmax backward avoids the CUDA kernel's float atomics."""

from __future__ import annotations

import pytest
import torch

from sparsevit import reference
import importlib

ms = importlib.import_module("sparsevit.ops.masked_softmax")


def _inputs():
    scores = torch.randn(2, 3, 7, 7)
    keep = torch.rand(2, 7)
    probs, mw, lam = reference.masked_softmax_stats(scores, keep, 1e-6)
    return torch.randn_like(scores), scores, keep, mw, lam


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_backward_atomics_only_when_nondeterministic(monkeypatch, deterministic: bool) -> None:
    calls = []

    def fake_cuda_backward(*args):
        calls.append(args)
        return reference.masked_softmax_grads(*args)

    monkeypatch.setattr(torch.ops.sparsevit, "masked_softmax_backward_cuda", fake_cuda_backward, raising=False)
    grad, scores, keep, mw, lam = _inputs()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        dp, dkeep = ms.softmax_bwd_impl(grad, scores, keep, mw, lam, 1e-6, "cuda")
    finally:
        torch.use_deterministic_algorithms(before)
    assert bool(calls) is (not deterministic)
    want_dp, want_dkeep = reference.masked_softmax_grads(grad, scores, keep, mw, lam, 1e-6)
    torch.testing.assert_close(dp, want_dp)
    torch.testing.assert_close(dkeep, want_dkeep)
