"""Backends and the choice among them.

Four backends serve the ops (each op declares which of them implement it):

* ``cuda``   -- the CUDA kernels of the C++ extension ``sparsevit._C`` (CUDA tensors);
* ``cpp``    -- the C++ CPU kernels of ``sparsevit._C`` (CPU tensors): the block-sparse
  products ``dds`` / ``dsd`` / ``sdd``, fp32, bf16 and fp16;
* ``triton`` -- the Triton kernels in ``sparsevit.kernels`` (CUDA tensors, or CPU
  tensors when ``TRITON_INTERPRET=1`` was set before Triton was imported);
* ``torch``  -- the pure-PyTorch reference (any device): the specification.

Each op declares, per backend, which devices and dtypes it supports and any
shape condition (an :class:`OpSupport`).  The backend is chosen as:

1. the explicit ``backend=`` argument of the op, else
2. the ``SPARSEVIT_BACKEND`` environment variable, else
3. the first backend of the op's preference order for the inputs' device that
   supports them (the fastest measured one; on the CPU that is ``cpp`` for the
   block-sparse products when the extension has its CPU kernels, else ``torch``:
   the Triton interpreter is for testing, not speed).

An explicit request (1 or 2) that cannot be served raises
:class:`BackendUnavailableError` listing why each backend was rejected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ._extension import CPU_KERNELS_ERROR, CUDA_KERNELS_ERROR, EXTENSION_ERROR

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "OpSupport",
    "Support",
    "backend_status",
    "backends",
    "backend_table",
    "choose_backend",
]

BACKENDS: tuple[str, ...] = ("cuda", "cpp", "triton", "torch")
# The backends whose kernels live in sparsevit._C, and the one device type each serves.
NATIVE_DEVICE = {"cuda": "cuda", "cpp": "cpu"}
ENV_VAR = "SPARSEVIT_BACKEND"
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


class BackendUnavailableError(ValueError):
    """The requested backend cannot serve these inputs (the message says why)."""


def triton_interpreter_enabled() -> bool:
    """True when Triton runs its kernels in the (CPU) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: list = []  # filled on first use: [None] or [reason]


def _triton_error() -> Optional[str]:
    """Why Triton cannot be imported here, or None (computed once, lazily)."""
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401

            _TRITON_ERROR.append(None)
        except Exception as exc:  # noqa: BLE001
            _TRITON_ERROR.append(f"triton is not importable ({type(exc).__name__}: {exc})")
    return _TRITON_ERROR[0]


def _backend_error(name: str, device_type: str) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device_type`` here, or None."""
    if name == "torch":
        return None
    if name in NATIVE_DEVICE:
        want = NATIVE_DEVICE[name]
        if device_type != want:
            return f"needs {want.upper()} tensors, got {device_type} tensors"
        return CUDA_KERNELS_ERROR if name == "cuda" else CPU_KERNELS_ERROR
    if name == "triton":
        err = _triton_error()
        if err is not None:
            return err
        if device_type == "cuda" or triton_interpreter_enabled():
            return None
        return f"needs CUDA tensors, or TRITON_INTERPRET=1 set before import for {device_type} tensors"
    raise BackendUnavailableError(f"backend must be one of {BACKENDS}, got {name!r}")


@dataclass(frozen=True)
class Support:
    """What one backend of one op accepts.

    ``check`` gets the op's tensors and returns a reason to reject them, or None.
    """

    devices: frozenset = frozenset({"cpu", "cuda"})
    dtypes: frozenset = FLOAT_DTYPES
    check: Optional[Callable[[Sequence[torch.Tensor]], Optional[str]]] = None

    def reject_reason(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype, device_type: str) -> Optional[str]:
        if device_type not in self.devices:
            return f"does not run on {device_type} (supports {sorted(self.devices)})"
        if dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            return f"does not support {str(dtype).replace('torch.', '')} (supports {names})"
        if self.check is not None:
            return self.check(tensors)
        return None


@dataclass(frozen=True)
class OpSupport:
    """Per-backend support of one op and its preference order per device type."""

    op: str
    backends: dict = field(default_factory=dict)
    preference: dict = field(
        default_factory=lambda: {"cuda": ("cuda", "triton", "torch"), "cpu": ("torch",)}
    )

    def reject_reason(self, backend: str, tensors: Sequence[torch.Tensor], dtype: torch.dtype, device_type: str) -> Optional[str]:
        err = _backend_error(backend, device_type)
        if err is not None:
            return err
        support = self.backends.get(backend)
        if support is None:
            return f"{self.op} has no {backend} implementation"
        return support.reject_reason(tensors, dtype, device_type)


def _requested_backend(backend: Optional[str]) -> tuple[Optional[str], str]:
    if backend is not None:
        return backend, "backend= argument"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env and env != "auto":
        return env, f"{ENV_VAR} environment variable"
    return None, ""


def choose_backend(
    support: OpSupport,
    tensors: Sequence[torch.Tensor],
    backend: Optional[str] = None,
    *,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Pick the backend for ``support.op`` on ``tensors`` (see the module docstring).

    ``dtype`` is the dtype that decides support (default: that of ``tensors[0]``);
    the device type is that of ``tensors[0]``.
    """
    if not isinstance(backend, (str, type(None))):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    device_type = tensors[0].device.type
    dtype = tensors[0].dtype if dtype is None else dtype
    requested, source = _requested_backend(backend)
    if requested is not None:
        if requested not in BACKENDS:
            raise BackendUnavailableError(
                f"backend (from the {source}) must be one of {BACKENDS} or 'auto', got {requested!r}"
            )
        reason = support.reject_reason(requested, tensors, dtype, device_type)
        if reason is None:
            return requested
        raise BackendUnavailableError(
            f"{support.op}: backend {requested!r} (from the {source}) cannot run these inputs "
            f"({device_type}, {dtype}): {reason}. "
            + _all_reasons(support, tensors, dtype, device_type)
        )
    order = support.preference.get(device_type, ("torch",))
    for name in order:
        if support.reject_reason(name, tensors, dtype, device_type) is None:
            return name
    raise BackendUnavailableError(
        f"{support.op}: no backend can run these inputs ({device_type}, {dtype}). "
        + _all_reasons(support, tensors, dtype, device_type)
    )


def _all_reasons(support: OpSupport, tensors: Sequence[torch.Tensor], dtype: torch.dtype, device_type: str) -> str:
    parts = []
    for name in BACKENDS:
        reason = support.reject_reason(name, tensors, dtype, device_type)
        parts.append(f"{name}: {'available' if reason is None else reason}")
    return "Backends: " + "; ".join(parts)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, per device type, and why not."""

    name: str
    cpu: Optional[str]
    cuda: Optional[str]


def backend_status() -> list[BackendStatus]:
    """The status of every backend on this machine (None = available)."""
    cuda_here = torch.cuda.is_available()
    out = []
    for name in BACKENDS:
        cpu = _backend_error(name, "cpu")
        cuda = _backend_error(name, "cuda") if cuda_here else "no CUDA device visible to torch"
        if name == "cuda" and not cuda_here and CUDA_KERNELS_ERROR is not None:
            cuda = f"{cuda}; {CUDA_KERNELS_ERROR}"
        out.append(BackendStatus(name, cpu, cuda))
    return out


def backend_table() -> str:
    """A text table of the backends available here, and why the others are not."""
    lines = ["backend | cpu tensors | cuda tensors", "--------+-------------+-------------"]
    for st in backend_status():
        cpu = "yes" if st.cpu is None else f"no: {st.cpu}"
        cuda = "yes" if st.cuda is None else f"no: {st.cuda}"
        lines.append(f"{st.name:<7} | {cpu} | {cuda}")
    if EXTENSION_ERROR is None:
        kernels = [f"{what} {'yes' if err is None else 'no'}" for what, err in
                   (("C++ CPU kernels", CPU_KERNELS_ERROR), ("CUDA kernels", CUDA_KERNELS_ERROR))]
        lines.append("extension sparsevit._C: loaded (" + ", ".join(kernels) + ")")
    else:
        lines.append("extension sparsevit._C: " + EXTENSION_ERROR)
    lines.append("triton: " + (_triton_error() or ("interpreter (TRITON_INTERPRET=1)" if triton_interpreter_enabled() else "compiled")))
    env = os.environ.get(ENV_VAR)
    lines.append(f"{ENV_VAR}={env!r}" if env else f"{ENV_VAR} unset: automatic choice per op and device")
    return "\n".join(lines)


class BackendStatusList(list):
    """The list :func:`backends` returns: :class:`BackendStatus` items, a one-line ``repr``.

    The table is printed already; a REPL then shows ``<backends: cpp, torch on cpu; none on cuda>``
    instead of the whole list again.
    """

    def __repr__(self) -> str:
        cpu = ", ".join(st.name for st in self if st.cpu is None) or "none"
        cuda = ", ".join(st.name for st in self if st.cuda is None) or "none"
        return f"<backends: {cpu} on cpu; {cuda} on cuda>"


def backends() -> BackendStatusList:
    """Print :func:`backend_table` and return :func:`backend_status` (a list with a one-line repr)."""
    print(backend_table())
    return BackendStatusList(backend_status())
