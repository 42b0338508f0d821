"""Self-describing tickets: save a mask manager's ticket with what it needs, apply it to a fresh model.

``save_ticket(path, manager)`` (a :class:`MaskManager`, or a trainer holding one in
``.manager``: RigL, SET, StaticSparse, LotteryTicket) stores, next to the masks, the
safetensors metadata

* ``sparsevit.granularity``: ``element`` or ``block``; ``sparsevit.block_size``: ``b`` or ``none``;
* ``sparsevit.layers``: JSON ``{layer name: weight shape}``;
* ``sparsevit.method``: the class that made it (``RigL``, ``LotteryTicket``, ``MaskManager``, ...);
* ``sparsevit.sparsity``: the total sparsity ``1 − Σ M / Σ numel`` over the masked layers.

:func:`apply_ticket` (also ``load_ticket(model, path)``) builds a :class:`MaskManager`
over exactly those layers of a fresh model of the same architecture, checks every
layer exists with the recorded weight shape, installs the masks and zeroes the
masked weights: ``W ← W ⊙ M``.  A ticket file without this metadata (written from a
bare ``{name: mask}`` mapping) is refused with the reason.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .masks import MaskManager

__all__ = ["DESCRIPTION_KEYS", "apply_ticket", "describe_manager", "manager_of"]

DESCRIPTION_KEYS = ("sparsevit.granularity", "sparsevit.block_size", "sparsevit.layers", "sparsevit.method",
                    "sparsevit.sparsity")


def manager_of(obj: object) -> Optional[MaskManager]:
    """``obj`` itself if it is a MaskManager, ``obj.manager`` if that is one, else None."""
    if isinstance(obj, MaskManager):
        return obj
    inner = getattr(obj, "manager", None)
    return inner if isinstance(inner, MaskManager) else None


def describe_manager(manager: MaskManager, method: str) -> dict[str, str]:
    """The ``sparsevit.*`` metadata of a ticket saved from ``manager`` (see the module docstring)."""
    layers = {name: list(layer.weight.shape) for name, layer in manager.layers.items()}
    return {
        "sparsevit.granularity": manager.granularity,
        "sparsevit.block_size": "none" if manager.block_size is None else str(manager.block_size),
        "sparsevit.layers": json.dumps(layers),
        "sparsevit.method": method,
        "sparsevit.sparsity": repr(manager.total_sparsity()) if manager.layers else "0.0",
    }


def _description(metadata: Mapping[str, str], path: str) -> tuple[str, Optional[int], dict[str, list[int]]]:
    missing = [k for k in ("sparsevit.granularity", "sparsevit.block_size", "sparsevit.layers") if k not in metadata]
    if missing:
        raise ValueError(f"ticket file {path!r} does not describe its masks (no {', '.join(missing)}): it was saved "
                         "from a bare mapping; load it with load_ticket(path) and LotteryTicket.load_masks / "
                         "MaskManager, or re-save it with save_ticket(path, manager)")
    granularity = metadata["sparsevit.granularity"]
    raw_block = metadata["sparsevit.block_size"]
    try:
        block = None if raw_block == "none" else int(raw_block)
        layers = json.loads(metadata["sparsevit.layers"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"ticket file {path!r} has corrupt sparsevit metadata: {err}") from None
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, list) for k, v in layers.items()):
        raise ValueError(f"ticket file {path!r} has corrupt sparsevit metadata: sparsevit.layers is not {{name: shape}}")
    return granularity, block, layers


def apply_ticket(model: nn.Module, path: Any, *, optimizer: Optional[torch.optim.Optimizer] = None) -> MaskManager:
    """Apply the ticket at ``path`` to ``model``: a :class:`MaskManager` over its layers with the ticket's masks.

    ``W ← W ⊙ M`` for every layer of the ticket; ``optimizer`` (optional) is attached so the
    masks are re-applied after each step.  Raises ValueError naming the layers the model
    lacks or whose weight shape differs from the recorded one, or a ticket without its
    description; TypeError for a model that is not an ``nn.Module``.  Nothing changes on error.
    """
    from .tickets import load_ticket

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    masks, metadata = load_ticket(path)
    granularity, block, layers = _description(metadata, str(path))
    if set(layers) != set(masks):
        raise ValueError(f"ticket file {str(path)!r}: its masks and its sparsevit.layers name different layers")
    modules = dict(model.named_modules())
    absent = sorted(n for n in layers if n not in modules or not isinstance(getattr(modules[n], "weight", None), torch.Tensor))
    wrong = sorted(f"{n}: ticket {tuple(s)}, model {tuple(modules[n].weight.shape)}" for n, s in layers.items()
                   if n not in absent and tuple(modules[n].weight.shape) != tuple(s))
    if absent or wrong:
        parts = ([f"layers missing from the model: {absent[:5]}"] if absent else []) + \
                ([f"weight shapes differ: {wrong[:5]}"] if wrong else [])
        raise ValueError(f"ticket file {str(path)!r} does not fit this model ({'; '.join(parts)})")
    manager = MaskManager(model, 0.0, distribution="uniform", granularity=granularity, block_size=block,
                          filter=lambda name, module: name in layers, init="dense")
    checked = manager.check_masks(masks, what=f"ticket file {str(path)!r}")
    manager._install_masks(checked)
    manager.apply_masks()
    if optimizer is not None:
        manager.attach(optimizer)
    return manager
