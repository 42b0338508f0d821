"""The kernel families the report covers: each is a kernels module and the spec module that
describes its launches.  Building the launches checks that every ``@triton.jit`` kernel of
the module has a spec (:func:`~.triton_specs.check_coverage`)."""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

from .triton_specs import Launch, SpecError, check_coverage, launchable_kernels

__all__ = ["SPEC_MODULES", "families", "launches"]

# family -> spec module (in this package)
SPEC_MODULES = {
    "block_sparse_matmul": "specs_block_sparse",
    "masked_attention": "specs_attention",
    "token_gather": "specs_token_gather",
}


def families() -> list[str]:
    return list(SPEC_MODULES)


def launches(selected: Optional[Sequence[str]] = None, patterns: Sequence[str] = ()) -> list[Launch]:
    """The launches of the ``selected`` families (default: all), coverage checked; with
    ``patterns``, only families with a kernel whose ``family/kernel`` contains one of them
    (the others' specs are not even built)."""
    names = list(selected) if selected else families()
    unknown = [n for n in names if n not in SPEC_MODULES]
    if unknown:
        raise SpecError(f"unknown kernel family {', '.join(unknown)}; known: {', '.join(SPEC_MODULES)}")
    out: list[Launch] = []
    for name in names:
        spec = importlib.import_module(f"{__package__}.{SPEC_MODULES[name]}")
        if patterns and not any(p in f"{name}/{k}" for k in launchable_kernels(spec.MODULE) for p in patterns):
            continue
        try:
            family_launches = spec.launches()
        except SpecError:
            raise
        except Exception as exc:  # noqa: BLE001 - the kernels module changed under its spec
            raise SpecError(f"building the launches of {spec.MODULE} failed ({type(exc).__name__}: {exc}); did the "
                            f"module change? Update sparsevit/kernel_report/{SPEC_MODULES[name]}.py") from exc
        check_coverage(spec.MODULE, family_launches, f"{SPEC_MODULES[name]}.py")
        out.extend(family_launches)
    return out
