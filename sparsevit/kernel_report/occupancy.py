"""Theoretical occupancy of one kernel launch configuration, as the CUDA occupancy calculator computes it.

Following ``cuda_occupancy.h`` (``cudaOccMaxActiveBlocksPerMultiprocessor``), with ``w``
warps per block, ``r`` registers per thread and ``s`` bytes of shared memory per block:

* registers: ``R_w = ceil(32·r / 256)·256`` per warp, allocated in each of the SM's 4
  sub-partitions (``65536 / 4`` registers each), so
  ``blocks_regs = floor(4 · floor(16384 / R_w) / w)`` (0 when ``r > 255``);
* shared memory: ``S_b = ceil((s + 1024) / 128)·128`` per block (1 KB reserved by the
  driver), so ``blocks_smem = floor(smem_per_SM / S_b)`` (0 when ``s`` exceeds the
  per-block maximum: the launch fails and the autotuner skips the config);
* threads: ``blocks_threads = floor(2048 / (32·w))``; and at most 32 blocks per SM.

``blocks = min(blocks_regs, blocks_smem, blocks_threads, 32)`` and

    occupancy = resident warps / max warps = blocks · w / 64.

The limiter is the term that gives the minimum (ties name all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .targets import Target

__all__ = ["Occupancy", "estimate"]

SUB_PARTITIONS = 4  # register file partitions per SM (compute capability 7.0 and later)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


@dataclass(frozen=True)
class Occupancy:
    """Resident blocks and warps per SM and what limits them."""

    blocks_per_sm: int
    warps_per_sm: int
    occupancy: float  # resident warps / max warps per SM, in [0, 1]
    limiter: str  # "regs", "smem", "threads", "blocks" (joined with "+" on ties), or why it cannot launch
    fits: bool  # False: the block cannot launch at all on this target

    def as_dict(self) -> dict:
        return dict(blocks_per_sm=self.blocks_per_sm, warps_per_sm=self.warps_per_sm,
                    occupancy=round(self.occupancy, 4), limiter=self.limiter, fits=self.fits)


def blocks_by_regs(target: Target, regs: int, num_warps: int) -> int:
    """Blocks per SM the register file allows (``cuda_occupancy.h``'s sub-partition rule)."""
    if regs > target.max_regs_per_thread:
        return 0
    if regs <= 0:
        return target.max_blocks_per_sm
    per_warp = _round_up(regs * target.warp_size, target.reg_alloc_unit)
    per_block = per_warp * _round_up(num_warps, SUB_PARTITIONS)  # the hardware's per-block check
    if per_block > target.regs_per_sm:
        return 0
    warps = (target.regs_per_sm // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS
    return warps // num_warps


def smem_per_block(target: Target, shared: int) -> int:
    """Bytes of shared memory one block takes from the SM: reserve added, rounded up."""
    return _round_up(shared + target.smem_reserved_per_block, target.smem_alloc_unit)


def blocks_by_smem(target: Target, shared: int) -> int:
    """Blocks per SM shared memory allows (0: more than one block may have)."""
    if shared > target.smem_per_block:
        return 0
    return target.smem_per_sm // smem_per_block(target, shared)


def estimate(target: Target, regs: int, shared: int, num_warps: int) -> Occupancy:
    """Occupancy on ``target`` of a block of ``num_warps`` warps using ``regs`` registers per
    thread and ``shared`` bytes of shared memory (see the module docstring for the formula)."""
    if num_warps <= 0:
        raise ValueError(f"num_warps must be positive, got {num_warps}")
    threads = num_warps * target.warp_size
    if threads > target.max_threads_per_block:
        return Occupancy(0, 0, 0.0, f"{threads} threads > {target.max_threads_per_block} per block", False)
    if regs > target.max_regs_per_thread:
        return Occupancy(0, 0, 0.0, f"{regs} registers > {target.max_regs_per_thread} per thread", False)
    if shared > target.smem_per_block:
        return Occupancy(0, 0, 0.0, f"{shared} B shared > {target.smem_per_block} B per block", False)
    limits = {
        "regs": blocks_by_regs(target, regs, num_warps),
        "smem": blocks_by_smem(target, shared),
        "threads": target.max_threads_per_sm // threads,
        "blocks": target.max_blocks_per_sm,
    }
    blocks = min(limits.values())
    if blocks == 0:
        return Occupancy(0, 0, 0.0, "regs: one block needs more than the register file", False)
    limiter = "+".join(name for name, value in limits.items() if value == blocks)
    warps = blocks * num_warps
    return Occupancy(blocks, warps, warps / target.max_warps_per_sm, limiter, True)
