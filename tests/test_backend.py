"""Backend choice: explicit argument, environment variable, automatic order, errors."""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit.backend import OpSupport, Support, backend_status, choose_backend

SUPPORT = OpSupport(
    op="demo",
    backends={
        "cuda": Support(devices=frozenset({"cuda"})),
        "triton": Support(dtypes=frozenset({torch.float16}), check=lambda ts: None if ts[0].shape[-1] % 2 == 0 else "needs an even last dim"),
        "torch": Support(),
    },
)


def test_automatic_choice_on_cpu_is_torch() -> None:
    assert choose_backend(SUPPORT, [torch.randn(2, 4)]) == "torch"


def test_explicit_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 4, dtype=torch.float16)
    assert choose_backend(SUPPORT, [x], "triton") == "triton"
    monkeypatch.setenv("SPARSEVIT_BACKEND", "triton")
    assert choose_backend(SUPPORT, [x]) == "triton"
    assert choose_backend(SUPPORT, [x], "torch") == "torch"  # the argument wins
    monkeypatch.setenv("SPARSEVIT_BACKEND", "auto")
    assert choose_backend(SUPPORT, [x]) == "torch"


def test_rejection_lists_every_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(sparsevit.BackendUnavailableError) as err:
        choose_backend(SUPPORT, [torch.randn(2, 3)], "triton")
    msg = str(err.value)
    assert "does not support float32" in msg
    assert "cuda: needs CUDA tensors" in msg and "torch: available" in msg
    with pytest.raises(ValueError, match="needs an even last dim"):
        choose_backend(SUPPORT, [torch.randn(2, 3, dtype=torch.float16)], "triton")
    monkeypatch.setenv("SPARSEVIT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SPARSEVIT_BACKEND environment variable"):
        choose_backend(SUPPORT, [torch.randn(2, 4)])
    monkeypatch.setenv("SPARSEVIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="must be one of"):
        choose_backend(SUPPORT, [torch.randn(2, 4)])


def test_missing_implementation() -> None:
    partial = OpSupport(op="partial", backends={"torch": Support()})
    with pytest.raises(ValueError, match="partial has no triton implementation"):
        choose_backend(partial, [torch.randn(2)], "triton")


def test_table_names_every_backend(capsys: pytest.CaptureFixture) -> None:
    status = sparsevit.backends()
    out = capsys.readouterr().out
    for name in sparsevit.BACKENDS:
        assert name in out
    assert "extension sparsevit._C" in out
    assert [s.name for s in status] == list(sparsevit.BACKENDS)
    torch_row = [s for s in backend_status() if s.name == "torch"][0]
    assert torch_row.cpu is None
    assert [s for s in backend_status() if s.name == "triton"][0].cpu is None  # interpreter on in tests


def test_backends_repr_is_one_line(capsys: pytest.CaptureFixture) -> None:
    status = sparsevit.backends()
    capsys.readouterr()
    text = repr(status)
    assert "\n" not in text and text.startswith("<backends: ") and "torch" in text
    available_cpu = [s.name for s in status if s.cpu is None]
    assert text.split(";")[0] == "<backends: " + ", ".join(available_cpu) + " on cpu"
    assert isinstance(status, list) and len(status) == len(sparsevit.BACKENDS)
