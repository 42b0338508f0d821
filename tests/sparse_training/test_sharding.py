"""The cross-shard top-k of FSDP2 support, simulated in one process: every split of the scores gives ``topk_mask``."""

from __future__ import annotations

import random

import pytest
import torch

from sparsevit.sparse_training.distributed_checkpoint import _empty_like_placeholder, _join, _placeholders, _split
from sparsevit.sparse_training.masks import topk_mask
from sparsevit.sparse_training.sharding import (
    CommStats,
    RowShard,
    check_block_aligned,
    global_std,
    lexicographic_order,
    local_candidates,
    select_from_candidates,
)


def _simulate(scores: torch.Tensor, sizes: list[int], k: int, largest: bool, low_index_first: bool) -> torch.Tensor:
    """What every rank computes: the candidates of each contiguous part, gathered, then the first k."""
    values, index, start = [], [], 0
    for n in sizes:
        part = scores[start:start + n]
        v, i = local_candidates(part, torch.arange(n) + start, k, scores.numel(), largest=largest,
                                low_index_first=low_index_first)
        assert v.numel() == i.numel() == k
        values.append(v)
        index.append(i)
        start += n
    chosen = select_from_candidates(torch.cat(values), torch.cat(index), k, largest, low_index_first)
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[chosen[(chosen >= 0) & (chosen < scores.numel())]] = True
    return out


def _reference(scores: torch.Tensor, k: int, largest: bool, low_index_first: bool) -> torch.Tensor:
    keyed = sorted(range(scores.numel()), key=lambda i: ((-1 if largest else 1) * float(scores[i]),
                                                         i if low_index_first else -i))
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[keyed[:k]] = True
    return out


@pytest.mark.parametrize("seed", range(6))
def test_split_selection_equals_whole_selection(seed: int) -> None:
    rng = random.Random(seed)
    total = rng.randint(1, 60)
    scores = torch.randint(0, 5, (total,)).float() if seed % 2 else torch.randn(total)  # ties on odd seeds
    world = rng.randint(1, 4)
    cuts = sorted(rng.randint(0, total) for _ in range(world - 1))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total])]  # empty parts included
    for k in {0, 1, total // 3, total - 1, total}:
        for largest, low in ((True, True), (False, False), (True, False), (False, True)):
            got = _simulate(scores, sizes, k, largest, low)
            assert torch.equal(got, _reference(scores, k, largest, low)), (sizes, k, largest, low)
        assert torch.equal(_simulate(scores, sizes, k, True, True), topk_mask(scores, k))
        # The k smallest, ties highest index first, are what topk_mask(total − k) leaves out.
        assert torch.equal(_simulate(scores, sizes, k, False, False), ~topk_mask(scores, total - k))


def test_lexicographic_order_breaks_ties_by_index() -> None:
    values = torch.tensor([1.0, 2.0, 1.0, 2.0, 0.0])
    index = torch.tensor([10, 3, 4, 7, 1])
    assert index[lexicographic_order(values, index, True, True)].tolist() == [3, 7, 4, 10, 1]
    assert index[lexicographic_order(values, index, True, False)].tolist() == [7, 3, 10, 4, 1]
    assert index[lexicographic_order(values, index, False, False)].tolist() == [1, 10, 4, 7, 3]


def test_padding_sorts_after_real_candidates() -> None:
    for largest, low in ((True, True), (False, False)):
        v, i = local_candidates(torch.tensor([5.0]), torch.tensor([2]), 3, 4, largest=largest, low_index_first=low)
        order = lexicographic_order(torch.cat([v, torch.tensor([-1e30 if largest else 1e30])]),
                                    torch.cat([i, torch.tensor([3])]), largest, low)
        assert order[:2].tolist() == [0, 3], "a real candidate sorted after the padding"
        assert not any(0 <= int(x) < 4 for x in i[1:]), "padding indices collide with real units"


def test_comm_stats_counts_calls_and_bytes() -> None:
    stats = CommStats()
    stats.add("all_gather topk values", 40)
    stats.add("all_gather topk values", 8)
    stats.add("all_reduce counts", 16)
    snap = stats.snapshot()
    assert snap["calls"] == 3 and snap["bytes_sent"] == 64
    assert snap["by_kind"]["all_gather topk values"] == {"calls": 2, "bytes_sent": 48}


def test_block_split_across_shards_is_refused() -> None:
    shard = RowShard(mesh=None, group=None, rank=0, world=2, global_rows=96, row_start=0, rows=48)
    with pytest.raises(ValueError, match=r"block_size=32 would split blocks of layer 'fc'.*48 rows"):
        check_block_aligned("fc", shard, 32)
    check_block_aligned("fc", shard, 16)


def test_global_std_unsharded_is_torch_std() -> None:
    t = torch.randn(7, 5)
    assert global_std(t, None) == float(t.std())


def test_checkpoint_skeleton_round_trip() -> None:
    state = {"t": 3, "history": [{"step": 2, "sparsity": 0.5, "dropped": {"fc": 4}}], "alpha": float("inf"),
             "manager": {"masks": {"fc": torch.ones(2, 3, dtype=torch.bool)}, "generator": torch.arange(4).byte()},
             "none": None, "pair": (1, 2)}
    tensors: list = []
    skeleton = _split(state, tensors)
    assert len(tensors) == 2 and len(_placeholders(skeleton)) == 2
    back = _join(skeleton, dict(enumerate(tensors)))
    assert back["history"] == state["history"] and back["pair"] == [1, 2] and back["t"] == 3
    assert torch.equal(back["manager"]["masks"]["fc"], state["manager"]["masks"]["fc"])
    with pytest.raises(TypeError, match="set"):
        _split({"bad": {1, 2}}, [])
    with pytest.raises(TypeError, match="str"):
        _split({1: 2}, [])
    with pytest.raises(ValueError, match="bad tensor entry"):
        _empty_like_placeholder({"__tensor__": 0, "shape": [-1], "dtype": "torch.bool", "sharded": False}, None)
    with pytest.raises(ValueError, match="not sharded"):
        _empty_like_placeholder({"__tensor__": 0, "shape": [4, 2], "dtype": "torch.bool", "sharded": True}, None)
    assert _empty_like_placeholder({"__tensor__": 0, "shape": [4, 2], "dtype": "torch.float32", "sharded": False},
                                   None).shape == (4, 2)
