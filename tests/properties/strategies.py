"""Shared pieces of the property tests: settings, backends, strided inputs, error bounds.

The property tests compare every public op with :mod:`sparsevit.reference` (and, for
the DynamicViT masked softmax, with a float64 evaluation of the published formula)
on generated cases.  A case is a small frozen dataclass of ints, floats and names
(readable in a falsifying example, usable in ``@example``); the tensors are built
from it with a seeded ``torch.Generator``, so a case always means the same tensors.
Inputs and upstream gradients are rounded to the op's dtype first: the op, PyTorch's
same-dtype code and the float64 truth all see the same values.

Accuracy rule (``ARCHITECTURE.md``, details in :func:`assert_matches`): float32 within
atol/rtol ≈ 1e-5/1e-4 of the float64 truth (atol relative to the tensor's largest
value); float16/bfloat16 within twice the error of PyTorch's own computation of the
same formula from the same rounded inputs, plus a few units of rounding of the
tensor's largest value, all measured against the float64 truth.

Run longer with ``SPARSEVIT_PROPERTY_SCALE=10`` (ten times the examples) and with
``SPARSEVIT_PROPERTY_SHRINK=1`` to get a minimal failing case.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pytest
import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st

from sparsevit.backend import BACKENDS, OpSupport, _backend_error

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------
# Settings: bounded, reproducible, no files written.
# ----------------------------------------------------------------------------------
# SPARSEVIT_PROPERTY_SCALE multiplies every example count (a longer local fuzz run);
# SPARSEVIT_PROPERTY_SHRINK=1 turns shrinking on (off by default: shrinking a failure
# re-runs the slow interpreted kernels hundreds of times, far beyond the CI budget,
# and the first failing case is printed either way).
_SCALE = float(os.environ.get("SPARSEVIT_PROPERTY_SCALE", "1"))
_PHASES = (Phase.explicit, Phase.generate) + (
    (Phase.shrink,) if os.environ.get("SPARSEVIT_PROPERTY_SHRINK") == "1" else ()
)
BASE_SETTINGS = settings(
    deadline=None,  # the Triton interpreter's first call of a kernel compiles it
    derandomize=True,  # the same cases on every run: CI failures reproduce
    database=None,  # derandomized runs need no example database (and write no files)
    phases=_PHASES,
    print_blob=False,
)


def examples(n: int) -> settings:
    """Settings running ``n`` generated examples (times SPARSEVIT_PROPERTY_SCALE)."""
    return settings(BASE_SETTINGS, max_examples=max(1, int(round(n * _SCALE))))


# ----------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------
def device_for(backend: str) -> torch.device:
    """Where a backend's cases run: the CPU for ``cpp`` (the extension's C++ CPU kernels),
    :data:`DEVICE` for the others."""
    return torch.device("cpu") if backend == "cpp" else DEVICE


def backends_for(support: OpSupport) -> list[str]:
    """Every backend of ``support.op`` that can run here, each on :func:`device_for` it.

    On a CPU-only machine that is ``torch``, ``triton`` (the conftest enables the
    interpreter) and, for the ops that have it, ``cpp``;
    ``test_expected_backends_are_available`` fails if one is missing, so a broken
    backend cannot silently drop out of the property tests.
    """
    names = []
    for name in BACKENDS:
        spec = support.backends.get(name)
        device = device_for(name).type
        if spec is None or device not in spec.devices:
            continue
        if _backend_error(name, device) is None:
            names.append(name)
    return names


def backend_params(support: OpSupport) -> list:
    return [pytest.param(name, id=name) for name in backends_for(support)]


def expected_backends(support: OpSupport) -> list[str]:
    """The backends that must be available here: torch and triton (a test dependency),
    ``cpp`` where the op has it (unless the install was told not to build the extension,
    ``SPARSEVIT_BUILD_EXT=0``) and, on a CUDA machine, ``cuda``."""
    want = [n for n in ("triton", "torch") if n in support.backends]
    build_ext = os.environ.get("SPARSEVIT_BUILD_EXT", "").strip().lower() not in ("0", "false", "no", "off")
    if "cpp" in support.backends and build_ext:
        want.append("cpp")
    if CUDA and "cuda" in support.backends:
        want.append("cuda")
    return want


# ----------------------------------------------------------------------------------
# Strided inputs: the same logical values stored contiguous, transposed, sliced or
# broadcast (expanded); gradients are taken with respect to the views the ops get.
# ----------------------------------------------------------------------------------
STRIDE_KINDS = ("contiguous", "transposed", "sliced", "expanded")


@dataclass(frozen=True)
class Stride:
    """How a logical tensor is stored: ``kind`` and the dims it acts on.

    * ``transposed``: stored with dims ``(a, b)`` swapped, viewed back by a transpose;
    * ``sliced``: every dim offset by one inside a larger buffer, the last dim with
      step 2;
    * ``expanded``: dim ``a`` broadcast from size 1 (stride 0); the values along it
      are those of its first entry.
    """

    kind: str = "contiguous"
    a: int = 0
    b: int = 1

    def leaf(self, full: torch.Tensor) -> torch.Tensor:
        """The storage holding ``full``'s values (after :meth:`values`)."""
        if self.kind == "transposed":
            return full.transpose(self.a, self.b).contiguous()
        if self.kind == "sliced":
            shape = [s + 1 for s in full.shape[:-1]] + [2 * full.shape[-1] + 1]
            buf = torch.zeros(shape, dtype=full.dtype, device=full.device)
            buf[self._slices(full.dim())] = full
            return buf
        if self.kind == "expanded" and full.shape[self.a] > 0:
            return full.narrow(self.a, 0, 1).contiguous()
        return full.clone()

    def view(self, leaf: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The logical ``shape`` view of ``leaf`` (non-contiguous except for ``contiguous``)."""
        if self.kind == "transposed":
            return leaf.transpose(self.a, self.b)
        if self.kind == "sliced":
            return leaf[self._slices(len(shape))]
        if self.kind == "expanded" and shape[self.a] > 0:
            return leaf.expand(*shape)
        return leaf

    def values(self, full: torch.Tensor) -> torch.Tensor:
        """The logical values this storage really holds (``expanded`` repeats one slice)."""
        return self.view(self.leaf(full), full.shape)

    def _slices(self, ndim: int) -> tuple:
        return tuple(slice(1, None) for _ in range(ndim - 1)) + (slice(1, None, 2),)


def strides(ndim: int, expandable: Sequence[int] = (), transposable: Sequence[tuple[int, int]] = ()) -> st.SearchStrategy:
    """A :class:`Stride` for an ``ndim``-dim tensor: expansion only along ``expandable``
    dims, transposes only of the ``transposable`` pairs (default: the last two dims)."""
    pairs = list(transposable) or ([(ndim - 2, ndim - 1)] if ndim >= 2 else [])
    options = [st.just(Stride()), st.just(Stride("sliced"))]
    if pairs:
        options.append(st.sampled_from([Stride("transposed", a, b) for a, b in pairs]))
    if expandable:
        options.append(st.sampled_from([Stride("expanded", a) for a in expandable]))
    return st.one_of(options)


@dataclass
class Operand:
    """One input: its storage in the test dtype and in float64 (the same values)."""

    stride: Stride
    shape: tuple
    low: torch.Tensor  # storage in the op's dtype
    exact: torch.Tensor  # the same storage in float64

    def inputs(self, requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh views ``(op's, own same-dtype, float64)`` of fresh leaves, for one run each.

        Gradients are taken with respect to these views (not the leaves): the gradient
        of a broadcast view would otherwise be summed by autograd in the test dtype.
        """
        return tuple(self.view(t.detach().clone().requires_grad_(requires_grad)) for t in (self.low, self.low, self.exact))

    def view(self, leaf: torch.Tensor) -> torch.Tensor:
        return self.stride.view(leaf, self.shape)


def operand(full: torch.Tensor, stride: Stride, dtype: torch.dtype) -> Operand:
    """Round ``full`` (float64, logical shape) to ``dtype`` and store it as ``stride`` says."""
    low = stride.leaf(full.to(dtype))
    return Operand(stride, tuple(full.shape), low, low.double())


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0, device: Optional[torch.device] = None) -> torch.Tensor:
    """Float64 normal values on ``device`` (default :data:`DEVICE`), drawn on the CPU so
    that every device sees the same values."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE if device is None else device)


# ----------------------------------------------------------------------------------
# Error bounds
# ----------------------------------------------------------------------------------
def max_abs(t: Optional[torch.Tensor]) -> float:
    return t.detach().double().abs().max().item() if t is not None and t.numel() else 0.0


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref.detach().double()).abs().max().item() if a.numel() else 0.0


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def assert_matches(
    name: str,
    got: Optional[torch.Tensor],
    truth: Optional[torch.Tensor],
    dtype: torch.dtype,
    own: "torch.Tensor | Sequence[Optional[torch.Tensor]] | None" = None,
    floor_units: float = 4.0,
    magnitude: float = 0.0,
) -> None:
    """``got`` (the op, in ``dtype``) against ``truth`` (float64).

    ``magnitude`` is the size of the terms the result is a sum of (e.g. for
    ``dq = scale · Σ_j dP_ij k_j`` with ``|dP_ij| ≲ |dO_i||v_j|``: ``2 · scale · max|dO|₂ ·
    max|v|₂ · max|k|``); rounding of those terms is unavoidable in any precision, so the
    floor is ``floor_units · (u · max|truth| + u₃₂ · magnitude)``: the standard backward-error
    bound of a sum (in float32, where kernels accumulate), which matters where the truth is
    a tiny difference of large terms.

    ``own`` is PyTorch's own result of the same formula from the same (rounded)
    inputs: in ``dtype``, and optionally also in float32 (a sequence); its error
    ``E = max over own of max|own − truth|`` says how well the problem can be solved
    in that precision.  With ``u`` the unit roundoff of ``dtype`` and
    ``atol = 1e-5 · max(1, max|truth|)``:

    * float32: ``|got − truth| ≤ atol + 1e-4 · |truth|`` elementwise, or, where
      cancellation makes even PyTorch's float32 result worse than that (large logits,
      gradients that are tiny differences of large terms), ``max|got − truth| ≤ 2E +
      floor_units · u · max|truth|``;
    * float16/bfloat16: ``max|got − truth| ≤ 2E + floor_units · u · max|truth| + atol``.
      Without a finite ``E``, ``1e-2 · max|truth|`` replaces ``2E`` (the ≤ 1e-2 relative
      rule).  The ``atol`` term keeps the bound from being tighter than the float32
      rule: a kernel computing in float32 inside may be off by float32 rounding even
      where the same-dtype PyTorch code happens to be exact (a probability of
      1 − 1e-9 rounds to exactly 1 and the gradient cancels to exactly 0).
    """
    if truth is None:
        assert got is None, f"{name}: expected no gradient, got one"
        return
    assert got is not None, f"{name}: missing (expected a tensor of shape {tuple(truth.shape)})"
    assert tuple(got.shape) == tuple(truth.shape), f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    if not bool(torch.isfinite(got).all()):
        bad = int((~torch.isfinite(got)).sum())
        raise AssertionError(f"{name}: {bad} non-finite values in the {dtype} result (the truth is finite)")
    baselines = [own] if isinstance(own, torch.Tensor) or own is None else list(own)
    errs = [max_err(o, truth) for o in baselines if o is not None]
    own_err = max((e for e in errs if math.isfinite(e)), default=math.inf) if errs else math.inf
    largest = max_abs(truth)
    err = max_err(got, truth)
    atol = 1e-5 * max(1.0, largest)
    # Terms of size `magnitude` are summed in float32 inside every kernel, whatever the dtype.
    floor = floor_units * (unit_roundoff(dtype) * largest + unit_roundoff(torch.float32) * magnitude)
    if dtype == torch.float32:
        if err <= floor or (math.isfinite(own_err) and err <= 2 * own_err + floor):
            return
        torch.testing.assert_close(
            got.detach().double(), truth.detach().double(), atol=atol, rtol=1e-4,
            msg=lambda m: f"{name}: {m} (PyTorch's own float32 error {own_err:.3g})",
        )
        return
    bound = (2 * own_err if math.isfinite(own_err) else 1e-2 * largest) + floor + atol
    assert err <= bound, (
        f"{name}: max error {err:.3g} > bound {bound:.3g} (PyTorch's own error {own_err:.3g}, "
        f"largest |truth| {largest:.3g})"
    )


def grads(out: torch.Tensor, inputs: Sequence[Optional[torch.Tensor]], grad: torch.Tensor) -> list:
    """d<out, grad>/d input for each input that requires grad (None for the others)."""
    need = [t for t in inputs if t is not None and t.requires_grad]
    got = list(torch.autograd.grad(out, need, grad, allow_unused=True)) if need and out.requires_grad else []
    result = []
    for t in inputs:
        if t is not None and t.requires_grad:
            g = got.pop(0) if got else None
            result.append(torch.zeros_like(t) if g is None else g)
        else:
            result.append(None)
    return result


def run_fwd_bwd(fn: Callable, leaves: Sequence[Optional[torch.Tensor]], grad: torch.Tensor) -> list:
    """``[out, *grads]`` of ``fn(*leaves)`` for the upstream gradient ``grad`` (cast to out's dtype)."""
    out = fn(*leaves)
    return [out.detach()] + grads(out, leaves, grad.to(out.dtype))
