"""Weights sharded by FSDP2 (``fully_shard``): where this rank's rows lie, and exact top-k across shards.

FSDP2 stores every parameter as a DTensor sharded on dim 0 the way ``torch.chunk``
splits it: with ``M`` rows on ``W`` ranks each chunk has ``c = ⌈M / W⌉`` rows, rank ``r``
holding rows ``[min(r c, M), min((r + 1) c, M))`` (the last ranks may hold fewer, or
none).  Flattened row-major, a rank's units (elements, or ``b × b`` blocks of the
matrix view) are one contiguous range ``[offset, offset + n)`` of the whole weight's
units, which is what :func:`sharded_topk_mask` needs.

:func:`sharded_topk_mask` selects, from the scores of every rank, exactly the units
``topk_mask`` would select on the whole (gathered) score tensor: the ``k`` largest
(or smallest) with ties broken by the global index (lowest first, or highest first),
without gathering the scores.  Each rank sends its own best ``min(k, n)`` candidates
(value and global index, ``12`` bytes each) padded to ``k``; every rank then orders the
``W · k`` candidates by ``(value, index)`` and keeps the first ``k``.  Every rank computes
the same answer from the same gathered data, so no broadcast follows.

:class:`CommStats` counts the collectives and the bytes each rank sent, so the cost of a
mask update can be reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["CommStats", "RowShard", "all_gather_rows", "all_reduce_sum", "check_block_aligned", "global_std",
           "is_dtensor", "lexicographic_order", "local_candidates", "select_from_candidates", "sharded_topk_indexed",
           "sharded_topk_mask", "shard_of"]


@dataclass
class CommStats:
    """Collectives issued and bytes sent by this rank (payload only)."""

    calls: int = 0
    bytes_sent: int = 0
    by_kind: dict = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.calls += 1
        self.bytes_sent += int(nbytes)
        calls, sent = self.by_kind.get(kind, (0, 0))
        self.by_kind[kind] = (calls + 1, sent + int(nbytes))

    def snapshot(self) -> dict:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent,
                "by_kind": {k: {"calls": c, "bytes_sent": b} for k, (c, b) in sorted(self.by_kind.items())}}


@dataclass(frozen=True)
class RowShard:
    """This rank's rows ``[row_start, row_start + rows)`` of a dim-0 sharded weight with ``global_rows`` rows."""

    mesh: object
    group: object
    rank: int
    world: int
    global_rows: int
    row_start: int
    rows: int

    @property
    def chunk(self) -> int:
        """``⌈M / W⌉``: the rows of a full chunk."""
        return -(-self.global_rows // self.world)


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def shard_of(name: str, weight: torch.Tensor) -> Optional[RowShard]:
    """The :class:`RowShard` of ``weight`` when it is an FSDP2 DTensor sharded on dim 0, None for a plain tensor.

    Raises TypeError for any other DTensor layout (a mesh of more than one dimension,
    e.g. HSDP, or a shard on another dim): the masks would not follow those shards.
    """
    if not is_dtensor(weight):
        return None
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    placements = tuple(weight.placements)
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise TypeError(
            f"{name}.weight is a DTensor with placements {placements} on a {mesh.ndim}-D mesh; sparsevit supports "
            "FSDP2 fully_shard with the default dim-0 sharding on a 1-D mesh (Shard(0)): use fully_shard(module, "
            "mesh=init_device_mesh(device, (world,))) without shard_placement_fn")
    group = mesh.get_group()
    rank = mesh.get_local_rank()
    world = mesh.size()
    rows_global = int(weight.shape[0])
    chunk = -(-rows_global // world)
    start = min(rank * chunk, rows_global)
    rows = min(start + chunk, rows_global) - start
    local = weight.to_local()
    if int(local.shape[0]) != rows:
        raise TypeError(f"{name}.weight: this rank holds {local.shape[0]} rows, FSDP2's torch.chunk layout gives {rows} "
                        f"(rows {start}..{start + rows} of {rows_global}); unsupported sharding")
    return RowShard(mesh=mesh, group=group, rank=rank, world=world, global_rows=rows_global, row_start=start, rows=rows)


def check_block_aligned(name: str, shard: RowShard, block_size: int) -> None:
    """ValueError when a shard boundary of ``shard`` would split a ``b × b`` block (``⌈M / W⌉ mod b ≠ 0``)."""
    if shard.world > 1 and shard.chunk % block_size:
        raise ValueError(
            f"block_size={block_size} would split blocks of layer {name!r} across FSDP2 shards: each of the "
            f"{shard.world} ranks holds ⌈{shard.global_rows}/{shard.world}⌉ = {shard.chunk} rows, not a multiple of "
            f"{block_size}; use a block size dividing {shard.chunk}, another world size, or leave the layer out "
            "with filter_fn")


def lexicographic_order(values: torch.Tensor, index: torch.Tensor, largest: bool, low_index_first: bool) -> torch.Tensor:
    """Permutation sorting by ``value`` (descending if ``largest``), ties by ``index`` (ascending if ``low_index_first``)."""
    by_index = torch.sort(index, descending=not low_index_first, stable=True).indices
    by_value = torch.sort(values[by_index], descending=largest, stable=True).indices
    return by_index[by_value]


def select_from_candidates(values: torch.Tensor, index: torch.Tensor, k: int, largest: bool,
                           low_index_first: bool) -> torch.Tensor:
    """The global indices of the first ``k`` candidates in :func:`lexicographic_order`."""
    order = lexicographic_order(values, index, largest, low_index_first)
    return index[order[:k]]


def _pad(values: torch.Tensor, index: torch.Tensor, k: int, largest: bool, low_index_first: bool,
         total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to ``k`` candidates that sort after every real one (worst value, worst index)."""
    missing = k - values.numel()
    if missing <= 0:
        return values, index
    worst = float("-inf") if largest else float("inf")
    pad_index = (torch.arange(missing, dtype=torch.int64) + total) if low_index_first else \
        (-1 - torch.arange(missing, dtype=torch.int64))
    return (torch.cat([values, torch.full((missing,), worst, dtype=values.dtype)]), torch.cat([index, pad_index]))


def local_candidates(scores: torch.Tensor, index: torch.Tensor, k: int, total: int, *, largest: bool = True,
                     low_index_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``k`` candidates ``(values f32, global indices i64)``: its best ``min(k, n)``, padded to ``k``.

    Any unit of the global top-``k`` that lives on this rank is among its own best ``k``,
    so the first ``k`` of all ranks' candidates in :func:`lexicographic_order` are the
    global top-``k``; the padding sorts after every real candidate.
    """
    flat = scores.detach().reshape(-1).float().cpu()
    index = index.reshape(-1).to(torch.int64).cpu()
    mine = lexicographic_order(flat, index, largest, low_index_first)[: min(int(k), flat.numel())]
    return _pad(flat[mine], index[mine], int(k), largest, low_index_first, int(total))


def sharded_topk_mask(local_scores: torch.Tensor, k: int, offset: int, total: int, group: object,
                      *, largest: bool = True, low_index_first: bool = True,
                      stats: Optional[CommStats] = None) -> torch.Tensor:
    """Bool mask of ``local_scores``' shape: this rank's share of the global top-``k`` (see the module docstring).

    ``local_scores`` are the units ``[offset, offset + n)`` of a score tensor of ``total``
    units split over the ranks of ``group``.  With ``largest=True, low_index_first=True``
    the result equals ``topk_mask(whole, k)[offset:offset + n]``; ``largest=False,
    low_index_first=False`` selects the ``k`` smallest, ties highest index first (the
    units ``topk_mask(whole, total − k)`` would leave out).
    """
    n = local_scores.numel()
    index = torch.arange(n, dtype=torch.int64) + int(offset)
    picked = sharded_topk_indexed(local_scores.reshape(-1), index, k, total, group, largest=largest,
                                  low_index_first=low_index_first, stats=stats)
    return picked.reshape(local_scores.shape)


def sharded_topk_indexed(local_scores: torch.Tensor, index: torch.Tensor, k: int, total: int, group: object,
                         *, largest: bool = True, low_index_first: bool = True,
                         stats: Optional[CommStats] = None) -> torch.Tensor:
    """:func:`sharded_topk_mask` for 1-D local scores whose global indices ``index`` need not be contiguous.

    Every global index in ``[0, total)`` must belong to exactly one rank.
    """
    flat = local_scores.detach().reshape(-1).float().cpu()
    index = index.reshape(-1).to(torch.int64).cpu()
    n = flat.numel()
    k = max(0, min(int(k), int(total)))
    out = torch.zeros(n, dtype=torch.bool)
    if k == 0:
        return out.to(local_scores.device)
    values, cand = local_candidates(flat, index, k, total, largest=largest, low_index_first=low_index_first)
    world = dist.get_world_size(group)
    device = _comm_device(group)
    all_values = [torch.empty(k, dtype=torch.float32, device=device) for _ in range(world)]
    all_index = [torch.empty(k, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(all_values, values.to(device), group=group)
    dist.all_gather(all_index, cand.to(device), group=group)
    if stats is not None:
        stats.add("all_gather topk values", 4 * k)
        stats.add("all_gather topk indices", 8 * k)
    chosen = select_from_candidates(torch.cat(all_values).cpu(), torch.cat(all_index).cpu(), k, largest, low_index_first)
    out = torch.isin(index, chosen)
    return out.to(local_scores.device)


def all_reduce_sum(values: Sequence[int], group: object, stats: Optional[CommStats] = None) -> list[int]:
    """The sums over the ranks of ``group`` of integer counts (one collective for all of them)."""
    buf = torch.tensor([int(v) for v in values], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    if stats is not None:
        stats.add("all_reduce counts", 8 * buf.numel())
    return [int(v) for v in buf.cpu()]


def all_gather_rows(local: torch.Tensor, shard: RowShard, global_shape: Sequence[int],
                    stats: Optional[CommStats] = None) -> torch.Tensor:
    """The whole tensor of ``global_shape`` from every rank's dim-0 rows (uneven chunks allowed)."""
    device = _comm_device(shard.group)
    chunk_rows = -(-int(global_shape[0]) // shard.world)
    padded_shape = (chunk_rows, *global_shape[1:])
    buf = torch.zeros(padded_shape, dtype=torch.uint8 if local.dtype == torch.bool else local.dtype, device=device)
    rows = int(local.shape[0])
    src = local.to(torch.uint8) if local.dtype == torch.bool else local
    buf[:rows] = src.to(device)
    parts = [torch.empty_like(buf) for _ in range(shard.world)]
    dist.all_gather(parts, buf, group=shard.group)
    if stats is not None:
        stats.add("all_gather rows", buf.numel() * buf.element_size())
    whole = torch.cat(parts)[: int(global_shape[0])]
    return whole.to(torch.bool) if local.dtype == torch.bool else whole


def global_std(t: torch.Tensor, shard: Optional[RowShard], stats: Optional[CommStats] = None) -> float:
    """Unbiased std of the whole tensor, ``sqrt(Σ (x − x̄)² / (N − 1))``; for a sharded one from its shards (two all-reduces).

    ``t`` is a plain tensor (its std) or a DTensor / this rank's rows of one sharded as ``shard``.
    """
    local = t.to_local() if is_dtensor(t) else t
    if shard is None or not is_dtensor(t) and int(local.shape[0]) == shard.global_rows:
        return float(local.detach().float().std())
    x = local.detach().double().reshape(-1).cpu()
    device = _comm_device(shard.group)
    head = torch.tensor([x.sum().item(), float(x.numel())], dtype=torch.float64, device=device)
    dist.all_reduce(head, group=shard.group)
    mean, count = head[0].item() / head[1].item(), head[1].item()
    sq = torch.tensor([((x - mean) ** 2).sum().item()], dtype=torch.float64, device=device)
    dist.all_reduce(sq, group=shard.group)
    if stats is not None:
        stats.add("all_reduce moments", 16)
        stats.add("all_reduce moments", 8)
    return math.sqrt(sq.item() / max(count - 1.0, 1.0)) if count > 1 else float("nan")


def _comm_device(group: object) -> torch.device:
    """The device collectives of ``group`` run on: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
