"""Sparse-training state in ``torch.distributed.checkpoint`` (DCP) checkpoints, for FSDP2 runs.

``trainer.state_dict()`` (RigL, SET, StaticSparse, LotteryTicket, MaskManager) holds
the sharded masks as DTensors sharded like their weights.  DCP keys every tensor by
its path and needs a template of the same keys to load into, but a trainer's state
has a variable structure (the history grows with every update; a LotteryTicket keeps
a mask set per round), so :func:`save_distributed_checkpoint` stores it as

* ``sparsevit/tensor/<i>``: every tensor of the state (a DTensor written by DCP one
  shard per rank, a plain tensor once), and
* ``sparsevit/skeleton``: a JSON string of the rest, each tensor replaced by
  ``{"__tensor__": i, "shape", "dtype", "sharded"}``,

next to any other state (e.g. ``get_state_dict(model, optimizer)``).
:func:`load_distributed_checkpoint` reads the skeleton, builds the tensor template
(sharded ``Shard(0)`` on the trainer's FSDP2 mesh, as ``torch.chunk`` splits rows),
loads the tensors and hands the rebuilt state to ``trainer.load_state_dict``, which
checks it completely before anything changes: a checkpoint of other layers, shapes or
granularity is a ValueError naming the checkpoint, and the trainer keeps its state.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, MutableMapping, Optional, Union

import torch

from .sharding import is_dtensor

__all__ = ["CHECKPOINT_KEY", "load_distributed_checkpoint", "save_distributed_checkpoint"]

CHECKPOINT_KEY = "sparsevit"

PathLike = Union[str, "os.PathLike[str]"]

_DTYPES = {str(d): d for d in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                              torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _trainer_state(trainer: object) -> dict:
    state_dict = getattr(trainer, "state_dict", None)
    load = getattr(trainer, "load_state_dict", None)
    if not callable(state_dict) or not callable(load):
        raise TypeError(f"trainer must be a sparse trainer or MaskManager with state_dict()/load_state_dict(), "
                        f"got {type(trainer).__name__}")
    return state_dict()


def _split(value: Any, tensors: list) -> Any:
    """``value`` with every tensor replaced by a placeholder, the tensors appended to ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        return {"__tensor__": len(tensors) - 1, "shape": list(value.shape), "dtype": str(value.dtype),
                "sharded": is_dtensor(value)}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("trainer state dict keys must be str to go into a distributed checkpoint")
        return {k: _split(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"trainer state holds a {type(value).__name__}, which a distributed checkpoint cannot store")


def _placeholders(value: Any) -> list[dict]:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return [value]
        return [p for v in value.values() for p in _placeholders(v)]
    if isinstance(value, list):
        return [p for v in value for p in _placeholders(v)]
    return []


def _join(value: Any, tensors: Mapping[int, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def _empty_like_placeholder(p: Mapping, mesh: object) -> torch.Tensor:
    """An empty tensor to load placeholder ``p`` into: a ``Shard(0)`` DTensor on ``mesh`` when it was sharded."""
    dtype = _DTYPES.get(str(p.get("dtype")))
    shape = p.get("shape")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"bad tensor entry {p!r}")
    if not p.get("sharded"):
        return torch.empty(shape, dtype=dtype)
    if mesh is None or not shape:
        raise ValueError("it holds sharded tensors, and this trainer's weights are not sharded by FSDP2")
    from torch.distributed.tensor import DTensor, Shard

    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-shape[0] // world)
    start = min(rank * chunk, shape[0])
    rows = min(start + chunk, shape[0]) - start
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    local = torch.empty([rows, *shape[1:]], dtype=dtype)
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)


def _mesh_of(trainer: object) -> object:
    manager = getattr(trainer, "manager", trainer)
    for layer in getattr(manager, "layers", {}).values():
        if getattr(layer, "shard", None) is not None:
            return layer.shard.mesh
    return None


def save_distributed_checkpoint(checkpoint_id: PathLike, trainer: object,
                                state: Optional[Mapping[str, Any]] = None) -> None:
    """Write ``trainer.state_dict()`` (and ``state``) with ``dcp.save`` (see the module docstring); every rank calls it."""
    import torch.distributed.checkpoint as dcp

    extra = dict(state or {})
    if CHECKPOINT_KEY in extra:
        raise ValueError(f"state must not use the key {CHECKPOINT_KEY!r}: it holds the trainer's state")
    tensors: list[torch.Tensor] = []
    skeleton = _split(_trainer_state(trainer), tensors)
    ours = {"skeleton": json.dumps(skeleton), "tensor": {str(i): t for i, t in enumerate(tensors)}}
    dcp.save({**extra, CHECKPOINT_KEY: ours}, checkpoint_id=os.fspath(checkpoint_id))


def load_distributed_checkpoint(checkpoint_id: PathLike, trainer: object,
                                state: Optional[MutableMapping[str, Any]] = None) -> None:
    """Load a :func:`save_distributed_checkpoint` checkpoint into ``trainer`` (and ``state``, in place).

    ``state`` (e.g. ``get_state_dict(model, optimizer)`` entries, for ``set_state_dict``)
    is loaded only after the trainer accepted its part.  Raises ValueError naming the
    checkpoint when it holds no sparsevit state or one that does not fit the trainer;
    the trainer (and ``state``) are then unchanged.
    """
    import torch.distributed.checkpoint as dcp

    path = os.fspath(checkpoint_id)
    _trainer_state(trainer)  # the type check
    what = f"checkpoint {path!r} does not fit this {type(trainer).__name__}"
    try:
        head = {CHECKPOINT_KEY: {"skeleton": ""}}
        dcp.load(head, checkpoint_id=path)
        skeleton = json.loads(head[CHECKPOINT_KEY]["skeleton"])
        mesh = _mesh_of(trainer)
        template = {str(p["__tensor__"]): _empty_like_placeholder(p, mesh) for p in _placeholders(skeleton)}
        if template:
            dcp.load({CHECKPOINT_KEY: {"tensor": template}}, checkpoint_id=path)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    except Exception as err:  # DCP reports a missing file, key or shape in several exception types
        raise ValueError(f"{what} (no sparsevit state, or other tensor shapes): {type(err).__name__}: "
                         f"{_first_line(err)}") from None
    loaded = _join(skeleton, {int(k): v for k, v in template.items()})
    try:
        trainer.load_state_dict(loaded)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: {err}") from None
    if state:
        dcp.load(state, checkpoint_id=path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""
