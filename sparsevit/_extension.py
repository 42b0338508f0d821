"""Loading of the optional C++/CUDA extension ``sparsevit._C``.

The extension registers the CUDA kernels as ``torch.ops.sparsevit.*_cuda`` ops.
It is optional: a missing or broken build never raises at import; it becomes a
reason in the backend table (``sparsevit.backends()``) and, where it matters, a
single warning:

* broken (the file exists but fails to load, e.g. built against another torch):
  always warned;
* missing while a GPU is visible: warned, since the ``cuda`` backend could run;
* missing on a machine without a GPU: no warning, the reason is in the table.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

__all__ = ["EXTENSION_ERROR", "extension_loaded", "SparseVitExtensionWarning"]


class SparseVitExtensionWarning(UserWarning):
    """Emitted once when ``sparsevit._C`` cannot be used."""


def _load() -> str | None:
    """Import ``sparsevit._C``; return None on success or the reason it failed."""
    if importlib.util.find_spec("sparsevit._C") is None:
        reason = (
            "sparsevit._C is not built (reinstall with a CUDA toolkit and a CUDA build of "
            "torch: SPARSEVIT_BUILD_CUDA=1 pip install --no-build-isolation .)"
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


def extension_loaded() -> bool:
    """True when ``sparsevit._C`` loaded and its ops are registered."""
    return EXTENSION_ERROR is None
