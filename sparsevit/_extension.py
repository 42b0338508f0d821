"""Loading of the optional C++/CUDA extension ``sparsevit._C``.

The extension registers its kernels as ``torch.ops.sparsevit.*_cpp`` ops (the C++ CPU
kernels, in every build) and ``torch.ops.sparsevit.*_cuda`` ops (only in a build with
the CUDA kernels); :data:`CPU_KERNELS_ERROR` and :data:`CUDA_KERNELS_ERROR` say whether
each set is there.  It is optional: a missing or broken build never raises at import;
it becomes a reason in the backend table (``sparsevit.backends()``) and, where it
matters, a single warning:

* broken (the file exists but fails to load, e.g. built against another torch):
  always warned;
* missing while a GPU is visible: warned, since the ``cuda`` backend could run;
* missing on a machine without a GPU: no warning, the reason is in the table.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

__all__ = ["CPU_KERNELS_ERROR", "CUDA_KERNELS_ERROR", "EXTENSION_ERROR", "extension_loaded", "SparseVitExtensionWarning"]


class SparseVitExtensionWarning(UserWarning):
    """Emitted once when ``sparsevit._C`` cannot be used."""


def _load() -> str | None:
    """Import ``sparsevit._C``; return None on success or the reason it failed."""
    if importlib.util.find_spec("sparsevit._C") is None:
        reason = (
            "sparsevit._C is not built (reinstall with a C++ compiler, and for the CUDA kernels "
            "a CUDA toolkit and a CUDA build of torch: SPARSEVIT_BUILD_EXT=1 pip install "
            "--no-build-isolation . fails loudly if the C++ kernels cannot build, "
            "SPARSEVIT_BUILD_CUDA=1 if the CUDA ones cannot)"
        )
        if torch.cuda.is_available():
            warnings.warn(reason + "; using the triton/torch backends", SparseVitExtensionWarning, stacklevel=3)
        return reason
    try:
        importlib.import_module("sparsevit._C")
    except Exception as exc:  # noqa: BLE001 - any failure to load must not break import
        reason = f"sparsevit._C failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(reason + "; using the triton/torch backends", SparseVitExtensionWarning, stacklevel=3)
        return reason
    return None


EXTENSION_ERROR: str | None = _load()


def _kernels_error(op: str, dispatch_key: str, what: str, how: str) -> str | None:
    """Why the loaded extension lacks ``op``'s ``dispatch_key`` kernel, or None if it has it."""
    if EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    try:
        if torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key):
            return None
    except RuntimeError:  # the op is not even declared
        pass
    return f"sparsevit._C was built without the {what} ({how})"


CPU_KERNELS_ERROR: str | None = _kernels_error(
    "sparsevit::dds_cpp", "CPU", "C++ CPU kernels", "an older build: rebuild with pip install --no-build-isolation ."
)
CUDA_KERNELS_ERROR: str | None = _kernels_error(
    "sparsevit::dds_cuda", "CUDA", "CUDA kernels",
    "SPARSEVIT_BUILD_CUDA=0, or no CUDA toolkit or CUDA build of torch at build time; "
    "rebuild with SPARSEVIT_BUILD_CUDA=1",
)


def extension_loaded() -> bool:
    """True when ``sparsevit._C`` loaded and its ops are registered."""
    return EXTENSION_ERROR is None
