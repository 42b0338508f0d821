"""Occupancy arithmetic of the kernel report against hand-computed CUDA occupancy-calculator values."""

from __future__ import annotations

import pytest

from sparsevit.kernel_report.occupancy import blocks_by_regs, blocks_by_smem, estimate, smem_per_block
from sparsevit.kernel_report.targets import TARGETS, target

SM80, SM90 = TARGETS[80], TARGETS[90]


def test_targets_limits() -> None:
    assert SM80.smem_per_sm == 164 * 1024 and SM80.smem_per_block == 163 * 1024
    assert SM90.smem_per_sm == 228 * 1024 and SM90.smem_per_block == 227 * 1024
    for t in (SM80, SM90):
        assert (t.regs_per_sm, t.max_regs_per_thread, t.max_threads_per_sm, t.max_blocks_per_sm) == (65536, 255, 2048, 32)
        assert t.max_warps_per_sm == 64
    with pytest.raises(ValueError, match="compute capability 75"):
        target(75)


@pytest.mark.parametrize("regs, warps, blocks", [
    (128, 4, 4),    # 4096 regs/warp: 4 warps per 16384-register sub-partition -> 16 warps
    (255, 8, 1),    # 8160 -> 8192 per warp: 2 per sub-partition -> 8 warps
    (33, 4, 12),    # 1056 -> 1280 per warp (256-register granularity): 12 per sub-partition
    (100, 1, 16),   # 3200 -> 3328: 4 per sub-partition -> 16, not 65536 // 3328 = 19
    (168, 4, 3),
    (32, 4, 16),
])
def test_blocks_by_regs(regs: int, warps: int, blocks: int) -> None:
    assert blocks_by_regs(SM90, regs, warps) == blocks


def test_shared_memory_reserve_and_granularity() -> None:
    assert smem_per_block(SM90, 0) == 1024
    assert smem_per_block(SM90, 1) == 1024 + 128
    assert smem_per_block(SM90, 100 * 1024) == 101 * 1024
    assert blocks_by_smem(SM90, 100 * 1024) == 2    # 228 KB // 101 KB
    assert blocks_by_smem(SM80, 100 * 1024) == 1    # 164 KB // 101 KB
    assert blocks_by_smem(SM80, 164 * 1024) == 0    # over the 163 KB per block


def test_estimate_limiters() -> None:
    occ = estimate(SM90, regs=128, shared=0, num_warps=4)
    assert (occ.blocks_per_sm, occ.warps_per_sm, occ.occupancy, occ.limiter, occ.fits) == (4, 16, 0.25, "regs", True)
    occ = estimate(SM90, regs=32, shared=0, num_warps=4)
    assert (occ.occupancy, occ.limiter) == (1.0, "regs+threads")
    occ = estimate(SM90, regs=32, shared=100 * 1024, num_warps=4)
    assert (occ.blocks_per_sm, occ.occupancy, occ.limiter) == (2, 0.125, "smem")
    occ = estimate(SM80, regs=32, shared=100 * 1024, num_warps=4)
    assert (occ.blocks_per_sm, occ.occupancy) == (1, 0.0625)
    occ = estimate(SM90, regs=16, shared=0, num_warps=1)  # 1-warp blocks: the 32-block cap
    assert (occ.blocks_per_sm, occ.occupancy, occ.limiter) == (32, 0.5, "blocks")


def test_estimate_does_not_fit() -> None:
    assert not estimate(SM80, regs=64, shared=200 * 1024, num_warps=4).fits  # > 163 KB
    assert estimate(SM90, regs=64, shared=200 * 1024, num_warps=4).fits      # <= 227 KB
    occ = estimate(SM90, regs=256, shared=0, num_warps=4)
    assert not occ.fits and "registers" in occ.limiter
    assert not estimate(SM90, regs=32, shared=0, num_warps=64).fits          # 2048 threads per block
    with pytest.raises(ValueError):
        estimate(SM90, regs=32, shared=0, num_warps=0)
