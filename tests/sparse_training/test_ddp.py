"""Two CPU processes under DistributedDataParallel (gloo): identical masks on every rank after every update."""

from __future__ import annotations

import datetime
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


def _flat_masks(alg) -> torch.Tensor:
    return torch.cat([m.flatten().to(torch.uint8).cpu() for m in alg.manager.masks().values()])


def _worker(rank: int, init_file: str) -> None:
    """Run every scenario; on success leave without the interpreter's teardown.

    A failure raises as usual (``mp.spawn`` reports its traceback).  After a success
    both ranks meet at a barrier, destroy the group and ``os._exit(0)``: gloo's worker
    threads can otherwise abort the process during interpreter finalisation
    ("terminate called without an active exception", SIGABRT) after the test passed.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        for cls_name, granularity in (("RigL", "element"), ("SET", "block"), ("RigL", "block")):
            _scenario(rank, cls_name, granularity)
        for granularity in ("element", "block"):
            _rst_scenario(rank, granularity)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _scenario(rank: int, cls_name: str, granularity: str) -> None:
    from st_helpers import batch, tiny_vit

    from sparsevit.sparse_training import SET, RigL

    cls = {"RigL": RigL, "SET": SET}[cls_name]
    model = tiny_vit(seed=rank)  # different per rank: DDP broadcasts rank 0's weights
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    block = 16 if granularity == "block" else None
    # A different seed per rank on purpose: the masks must still agree (broadcast from rank 0).
    alg = cls(model, opt, 0.5 if block else 0.8, delta_t=2, t_end=6, seed=rank, granularity=granularity, block_size=block)
    changed = 0
    before = _flat_masks(alg)
    for t in range(1, 7):
        x, y = batch(seed=100 * rank + t)  # different data on every rank
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        alg.step()
        flat = _flat_masks(alg)
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), f"{cls_name}: masks differ across ranks at step {t}"
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        ws = [torch.empty_like(w) for _ in range(WORLD)]
        dist.all_gather(ws, w)
        assert all(torch.equal(ws[0], v) for v in ws), f"weights differ across ranks at step {t}"
        changed += int(not torch.equal(before, flat))
        before = flat
    assert changed >= 1, f"{cls_name}/{granularity}: the masks never changed"


def _same_on_every_rank(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0], g) for g in gathered)


def _rst_scenario(rank: int, granularity: str) -> None:
    """RST: the random masks agree across ranks (a different seed per rank: broadcast from rank 0), the
    penalty phase keeps the weights identical, and the removal zeroes the same weights everywhere."""
    from st_helpers import batch, tiny_vit

    from sparsevit.sparse_training import RandomSparseTransformation

    model = tiny_vit(seed=rank)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    block = 16 if granularity == "block" else None
    rst = RandomSparseTransformation(model, 0.5, granularity=granularity, block_size=block, seed=rank,
                                     lambda_step=0.1, lambda_every=1, penalty_steps=3, optimizer=opt)
    flat = torch.cat([m.flatten().to(torch.uint8) for m in rst.masks().values()])
    assert _same_on_every_rank(flat), f"RST/{granularity}: target masks differ across ranks"
    for t in range(1, 6):
        x, y = batch(seed=100 * rank + t)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        rst.step()
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert _same_on_every_rank(w), f"RST/{granularity}: weights differ across ranks at step {t}"
    assert rst.finalized
    for layer in rst.manager:
        assert bool((layer.weight[~layer.element_mask] == 0).all())


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_masks_identical_across_ranks(tmp_path) -> None:
    """RigL (element and block), SET (block) and RST (element and block), one process group for all (spawning
    is the slow part)."""
    init_file = os.path.join(tmp_path, "init")
    mp.spawn(_worker, args=(init_file,), nprocs=WORLD, join=True)
