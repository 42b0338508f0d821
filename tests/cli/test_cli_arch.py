"""Which compiled GPU code runs on which device (the rules ``info`` applies)."""

from __future__ import annotations

import pytest

from sparsevit.cli import arch


@pytest.mark.parametrize("code, capability, runs", [
    ("sm_90", (9, 0), True),
    ("sm_80", (8, 6), True),  # same major, older minor: binary compatible
    ("sm_86", (8, 0), False),  # newer minor than the device
    ("sm_80", (9, 0), False),  # cubins do not cross major versions
    ("sm_90a", (9, 0), True),
    ("sm_90a", (9, 1), False),  # arch-specific code runs on that exact arch only
    ("compute_80", (9, 0), True),  # PTX is compiled for newer devices by the driver
    ("compute_90", (8, 6), False),
    ("sm_120", (12, 0), True),
    ("bogus", (9, 0), False),
])
def test_arch_runs_on(code: str, capability: tuple, runs: bool) -> None:
    assert arch.arch_runs_on(code, capability) is runs


def test_torch_arch_verdict() -> None:
    ok, why = arch.torch_arch_verdict((9, 0), ["sm_80", "sm_90"])
    assert ok and "sm_90 is in" in why
    ok, why = arch.torch_arch_verdict((8, 6), ["sm_80"])
    assert ok and "sm_80 runs on it" in why
    ok, why = arch.torch_arch_verdict((10, 0), ["sm_80", "sm_90"])
    assert not ok and "nothing that runs on sm_100" in why


def test_extension_archs_says_why_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    assert arch.extension_archs(None) == (None, "sparsevit._C is not built")
    monkeypatch.setattr(arch, "_cuobjdump", lambda: None)
    archs, why = arch.extension_archs("/nonexistent/_C.so")
    assert archs is None and "does not record its TORCH_CUDA_ARCH_LIST" in why
