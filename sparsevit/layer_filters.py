"""Which layers a converter or mask manager touches by default, and the two filter conventions.

Every entry point that selects layers (:func:`sparsevit.nn.sparsify_linears`,
:class:`sparsevit.sparse_training.MaskManager` and the trainers built on it) leaves
out the patch embedding / stem and the classifier head by default, and takes either

* ``filter(name, module) -> bool`` (sparsevit's order: the qualified name first), or
* ``filter_fn(module, fqn) -> bool`` (torchao's order, as in ``quantize_(model, ...,
  filter_fn=...)``),

never both.  A layer is kept when the filter returns a truthy value.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

__all__ = ["SKIP_NAMES", "LayerFilter", "default_filter", "is_stem_or_head", "resolve_filter"]

SKIP_NAMES = frozenset({"patch_embed", "stem", "conv_stem", "head", "classifier", "pre_logits"})

LayerFilter = Callable[[str, nn.Module], bool]


def is_stem_or_head(name: str) -> bool:
    """True when a component of the dotted ``name`` is in :data:`SKIP_NAMES`, or ``name`` is a top-level ``fc``."""
    return bool(SKIP_NAMES.intersection(name.split("."))) or name == "fc"


def default_filter(name: str, module: nn.Module) -> bool:
    """Sparsify ``nn.Linear`` and ``nn.Conv2d`` weights, except the patch embedding / stem and the head.

    A module is skipped when any component of its dotted ``name`` is one of
    ``patch_embed``, ``stem``, ``conv_stem``, ``head``, ``classifier``, ``pre_logits``,
    or when it is a top-level ``fc`` (a ResNet classifier).  Norms, biases and
    embeddings are never selected: only ``.weight`` of Linear/Conv2d is.
    """
    return isinstance(module, (nn.Linear, nn.Conv2d)) and not is_stem_or_head(name)


def resolve_filter(filter: Optional[Callable], filter_fn: Optional[Callable],  # noqa: A002 - the public name
                   default: LayerFilter) -> LayerFilter:
    """The ``(name, module)`` predicate from ``filter=`` or torchao-style ``filter_fn=`` (else ``default``).

    Raises TypeError when both are given or one is not callable.
    """
    if filter is not None and filter_fn is not None:
        raise TypeError("give filter=(name, module) -> bool or filter_fn=(module, fqn) -> bool, not both")
    if filter_fn is not None:
        if not callable(filter_fn):
            raise TypeError(f"filter_fn must be a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
        return lambda name, module: bool(filter_fn(module, name))
    if filter is not None:
        if not callable(filter):
            raise TypeError(f"filter must be a callable (name, module) -> bool, got {type(filter).__name__}")
        return filter
    return default
