"""FSDP2 (``fully_shard``) on 2 CPU gloo processes: sharded masks equal the single-process ones.

One spawn runs every scenario of ``fsdp2_scenarios.py`` (spawning is the slow part);
the per-update communication of RigL is written to a JSON file the test reads back.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not hasattr(dist, "all_gather"),
                                reason="torch.distributed is not available")


def _worker(rank: int, init_file: str, tmp: str) -> None:
    """Run every scenario; after a success meet at a barrier and ``os._exit(0)`` (gloo teardown can abort)."""
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        import fsdp2_scenarios as sc

        comm = {}
        for kind, granularity in (("rigl", "element"), ("rigl", "block"), ("set", "block")):
            comm[f"{kind}/{granularity}"] = sc.scenario_rigl_matches_single_process(kind, granularity)
        sc.scenario_rigl_matches_single_process("rigl", "element", accumulate=2)
        for scope in ("layer", "global"):
            sc.scenario_lottery_matches_single_process(scope, "element")
        sc.scenario_lottery_matches_single_process("global", "block")
        sc.scenario_checkpoint_resume(os.path.join(tmp, "ckpt"))
        sc.scenario_ticket_file(tmp)
        sc.scenario_uneven_rows()
        sc.scenario_block_misaligned()
        sc.scenario_refusals()
        sc.scenario_supermask()
        if rank == 0:
            with open(os.path.join(tmp, "comm.json"), "w") as fh:
                json.dump(comm, fh)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_fsdp2_two_ranks_match_single_process(tmp_path) -> None:
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(init_file, str(tmp_path)), nprocs=WORLD, join=True)
    comm = json.loads((tmp_path / "comm.json").read_text())
    for name, c in comm.items():
        # Per update: one all-reduce of the active counts, two all-gathers (values, indices)
        # per selection (drop, grow) per layer, the regrown count and the sparsity counts.
        assert c["calls"] > 0 and c["bytes_sent"] > 0, name

