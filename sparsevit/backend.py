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
3. the first backend, in the op's default order for the inputs' device class, that
   supports them.  The orders are one table, :data:`DEFAULT_ORDERS` (op -> device
   class -> order), with the evidence for each entry written beside it.  Device
   classes: ``cpu``; ``sm_90`` (compute capability 9.x and newer), ``sm_80`` (8.x)
   and ``cuda`` (older GPUs) for CUDA tensors.  No entry is a GPU timing: none has
   been measured on a GPU.  The GPU entries come from what the compiler makes of each
   kernel for that architecture (``python -m sparsevit.kernel_report``: the MMA
   instructions, ``cp.async``, vector widths, registers, spills) and from how each
   kernel is built; the CPU entries from the CPU benchmark suites.  On the CPU the
   Triton interpreter is for testing, never a default.

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
    "DEFAULT_ORDERS",
    "DefaultOrder",
    "default_order",
    "device_class",
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
class DefaultOrder:
    """The automatic backend order of one op on one device class, and why."""

    order: tuple
    reason: str


_REPORT = "kernel report: python -m sparsevit.kernel_report"

_SOFTMAX_GPU = DefaultOrder(("cuda", "torch"), "one fused CUDA kernel (one warp per row) against the reference's "
                            "chain of elementwise kernels")
_TOKENS_GPU = DefaultOrder(("cuda", "triton", "torch"),
                           f"bandwidth-bound copies: both kernels move 16 bytes per access ({_REPORT}); the CUDA "
                           "one launches without Triton's Python-side dispatch")

# The one table of automatic choices: op -> device class -> order, with the evidence.
DEFAULT_ORDERS: dict[str, dict[str, DefaultOrder]] = {
    "block_sparse_matmul": {
        "sm_90": DefaultOrder(("triton", "cuda", "torch"),
                              "Triton's fp16/bf16 tiles lower to wgmma (Hopper's asynchronous MMA) with a "
                              "cp.async pipeline; the CUDA kernel's WMMA lowers to mma.sync (HMMA) without cp.async, "
                              f"one shared buffer and 2-byte loads ({_REPORT})"),
        "sm_80": DefaultOrder(("triton", "cuda", "torch"),
                              "both use mma.sync (HMMA), but only Triton's tiles are fed by a multi-stage cp.async "
                              f"pipeline with 16-byte loads ({_REPORT})"),
        "cuda": DefaultOrder(("cuda", "triton", "torch"),
                             "GPUs before sm_80: the kernel report covers sm_80 and sm_90 only; the CUDA kernel is "
                             "built for the extension's TORCH_CUDA_ARCH_LIST"),
        "cpu": DefaultOrder(("cpp", "torch"),
                            "the C++ CPU kernels compute only the kept blocks (blocksparse and vit_blocksparse CPU "
                            "suites); the Triton interpreter is for tests"),
    },
    "masked_attention": {
        "sm_90": DefaultOrder(("triton", "cuda", "torch"),
                              "one fused flash-style Triton kernel (wgmma, cp.async; the N×N scores never reach "
                              "DRAM); the cuda path is cuBLAS QKᵀ and ÃV around the CUDA masked softmax, which "
                              f"writes and reads the N×N matrix ({_REPORT})"),
        "sm_80": DefaultOrder(("triton", "cuda", "torch"),
                              "the fused Triton kernel (mma.sync, cp.async) keeps the N×N scores on chip; the cuda "
                              f"path writes them to DRAM ({_REPORT})"),
        "cuda": DefaultOrder(("triton", "cuda", "torch"),
                             "the fused kernel's traffic is O(N·D) against the cuda path's O(N²) per head"),
        "cpu": DefaultOrder(("torch",), "the PyTorch reference; the Triton interpreter is for tests"),
    },
    "masked_softmax": {klass: _SOFTMAX_GPU for klass in ("sm_90", "sm_80", "cuda")}
    | {"cpu": DefaultOrder(("torch",), "the only CPU implementation")},
    "token_gather": {"sm_90": _TOKENS_GPU, "sm_80": _TOKENS_GPU,
                     "cuda": DefaultOrder(("cuda", "triton", "torch"), "bandwidth-bound copies; the CUDA kernel "
                                          "launches without Triton's Python-side dispatch"),
                     "cpu": DefaultOrder(("torch",), "torch's index_select / scatter kernels; the Triton "
                                         "interpreter is for tests")},
}

_GENERIC = {
    "cuda": DefaultOrder(("cuda", "triton", "torch"), "no entry in DEFAULT_ORDERS: the native kernels first"),
    "cpu": DefaultOrder(("cpp", "torch"), "no entry in DEFAULT_ORDERS: the native kernels first"),
}
DEVICE_CLASSES: tuple[str, ...] = ("sm_90", "sm_80", "cuda", "cpu")


def device_class(device: torch.device, capability: Optional[tuple[int, int]] = None) -> str:
    """The row of :data:`DEFAULT_ORDERS` for ``device``: ``cpu``, ``sm_90`` (capability ≥ 9.0),
    ``sm_80`` (8.x) or ``cuda`` (older).  ``capability`` overrides the device's own."""
    if device.type != "cuda":
        return "cpu"
    major = (capability or _capability(device.index))[0]
    return "sm_90" if major >= 9 else "sm_80" if major == 8 else "cuda"


_CAPABILITIES: dict = {}


def _capability(index: Optional[int]) -> tuple[int, int]:
    index = torch.cuda.current_device() if index is None else index
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITIES[index]


def default_order(op: str, klass: str) -> DefaultOrder:
    """The automatic order of ``op`` on device class ``klass`` (see :data:`DEFAULT_ORDERS`)."""
    if klass not in DEVICE_CLASSES:
        raise ValueError(f"device class must be one of {DEVICE_CLASSES}, got {klass!r}")
    rows = DEFAULT_ORDERS.get(op)
    if rows is None:
        return _GENERIC["cpu" if klass == "cpu" else "cuda"]
    return rows[klass]


@dataclass(frozen=True)
class OpSupport:
    """Per-backend support of one op; its automatic order is its :data:`DEFAULT_ORDERS` row."""

    op: str
    backends: dict = field(default_factory=dict)

    def order_for(self, device: torch.device) -> tuple:
        """The automatic backend order on ``device`` (device class -> :func:`default_order`)."""
        return default_order(self.op, device_class(device)).order

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
    for name in support.order_for(tensors[0].device):
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
    lines += ["", *default_lines()]
    return "\n".join(lines)


def default_lines(classes: Optional[Sequence[str]] = None) -> list[str]:
    """Per op and device class: the automatic default here, its order and the reason.

    ``classes`` defaults to ``cpu`` plus the visible GPU's class (``sm_90`` when no GPU
    is visible, marked as such).  The default is the first backend of the order that
    can run on that device type here (dtype and shape conditions aside).
    """
    gpu_here = torch.cuda.is_available()
    if classes is None:
        classes = ["cpu", device_class(torch.device("cuda")) if gpu_here else "sm_90"]
    lines = ["default backend per op (first available of the order; DEFAULT_ORDERS):"]
    for klass in classes:
        device_type = "cpu" if klass == "cpu" else "cuda"
        where = klass if device_type == "cpu" or gpu_here else f"{klass}, no GPU visible here"
        lines.append(f"  on {where}:")
        for op in DEFAULT_ORDERS:
            entry = default_order(op, klass)
            if device_type == "cuda" and not gpu_here:
                chosen = entry.order[0]
            else:
                chosen = next((b for b in entry.order if _backend_error(b, device_type) is None), "torch")
            lines.append(f"    {op}: {chosen} (order {' > '.join(entry.order)}) -- {entry.reason}")
    return lines


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
