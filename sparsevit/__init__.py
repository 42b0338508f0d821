"""sparsevit: Triton and C++/CUDA kernels that make sparse Vision Transformers run faster.

Quick start::

    import sparsevit
    sparsevit.backends()                       # what runs here, and why not
    tokens, idx = sparsevit.select_tokens(x, scores, keep=0.7)
    w = sparsevit.BlockSparseMatrix.from_dense(weight, block_size=64, sparsity=0.75)
    y = sparsevit.dds(x, w.t())               # x @ Wᵀ on the kept blocks only

The optional C++ extension (``sparsevit._C``: CPU kernels wherever a compiler was found,
CUDA kernels where a toolkit was) is loaded first so that its ops are registered before
the Python custom ops of the same namespace.  timm is imported only when a model
integration needs it.
"""

from ._extension import SparseVitExtensionWarning, extension_loaded  # noqa: I001  (load _C first)
from .backend import BACKENDS, BackendUnavailableError, backend_table, backends, choose_backend
from .block_sparse import BlockSparseMatrix
from .layout import BlockSparseLayout
from . import nn  # noqa: E402  (sparsevit.nn.BlockSparseLinear)
from .ops import dds, dsd, gather_tokens, masked_attention, masked_softmax, scatter_add_tokens, scatter_tokens, sdd, select_tokens

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "BlockSparseLayout",
    "BlockSparseMatrix",
    "SparseVitExtensionWarning",
    "backend_table",
    "backends",
    "choose_backend",
    "extension_loaded",
    "dds",
    "dsd",
    "sdd",
    "gather_tokens",
    "masked_attention",
    "masked_softmax",
    "scatter_tokens",
    "scatter_add_tokens",
    "select_tokens",
    "__version__",
]
