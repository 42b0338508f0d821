"""Per-SM resource limits of the GPU architectures the kernel report covers.

Numbers from the CUDA C++ Programming Guide, "Technical Specifications per Compute
Capability", and the CUDA Occupancy Calculator, for compute capability 8.0 (A100) and
9.0 (H100/H200).  Shared memory: what one SM can hold in total, what one block may
use at most (the opt-in maximum), and the 1 KB the driver reserves for every resident
block.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Target", "TARGETS", "target"]


@dataclass(frozen=True)
class Target:
    """Resource limits of one SM of a compute capability."""

    name: str
    capability: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    warp_size: int = 32
    reg_alloc_unit: int = 256  # registers are allocated per warp, in multiples of this
    smem_per_sm: int = 0  # bytes an SM can give to resident blocks
    smem_per_block: int = 0  # bytes one block may use at most (dynamic, opted in)
    smem_alloc_unit: int = 128  # shared memory is allocated per block, in multiples of this
    smem_reserved_per_block: int = 1024  # bytes the driver reserves per resident block

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // self.warp_size


TARGETS: dict[int, Target] = {
    80: Target(name="sm_80", capability=80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: Target(name="sm_90", capability=90, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}


def target(capability: int) -> Target:
    """The limits of ``capability`` (80 or 90); a clear error for any other."""
    try:
        return TARGETS[capability]
    except KeyError:
        known = ", ".join(str(c) for c in sorted(TARGETS))
        raise ValueError(f"no resource limits for compute capability {capability}; known: {known}") from None
