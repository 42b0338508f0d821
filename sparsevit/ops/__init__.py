"""The public functional API of sparsevit: one module per op family.

Every op validates its arguments, picks a backend (:mod:`sparsevit.backend`) and
calls a ``torch.library`` custom op under the ``sparsevit`` namespace.
"""

from .block_sparse_matmul import dds, dsd, sdd
from .masked_attention import masked_attention
from .masked_softmax import masked_softmax
from .token_gather import gather_tokens, scatter_add_tokens, scatter_tokens, select_tokens

__all__ = [
    "dds", "dsd", "sdd", "masked_attention", "masked_softmax",
    "gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens",
]
