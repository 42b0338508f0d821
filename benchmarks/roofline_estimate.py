"""Expected fraction of the roofline floor for ``dds`` on an H100, per backend: an analytic estimate.

No GPU timing goes into this: it combines the minimum work of a block-sparse Linear with
what the kernel report says each kernel becomes on sm_90 (MMA family, pipeline depth,
tile shapes) and how each kernel walks its operands.  Every number it prints is an
estimate, to be replaced by ``make gpu-check`` (whose records carry the measured
``frac_of_floor``) the first time the kernels meet an H100.

The shape is ViT-B's fc1 / fc2 at batch 256 (M = 256·197 = 50432 tokens), bf16, block 64.

Floor (per product)::

    floor = max(F / P, B / W)
    F = 2·M·K·N·d                        (nonzero work, d the block density)
    B = 2·(M·K + d·K·N + M·N)            (each operand read once, the output written once)

with P = 989 TFLOP/s (dense bf16) and W = 3.35 TB/s (HBM3).  fwd is one ``dds``; fwd+bwd
adds the input gradient (``dds`` with Wᵀ) and the weight gradient (``sdd``).

Model of a kernel's time::

    t = max(F / (P · e_mma · u), B_moved / (W · e_bw))

* ``e_mma``, the fraction of peak the MMA path reaches when it is busy (assumptions):
  wgmma fed by a ``num_stages``-deep pipeline 0.70; the old Triton tiles (wgmma in only
  some configs, the pipeline limited to 1-2 buffers behind dependent index loads) 0.40;
  the CUDA kernel's WMMA (mma.sync on Hopper, about half its peak at best) with one
  shared buffer, no ``cp.async`` and 2-byte loads 0.20.
* ``e_bw`` = 0.85, what streaming kernels reach of HBM bandwidth.
* ``u``, the share of SMs with work: 1 for the token-tiled products; for ``sdd``
  ``min(1, programs / SMs)`` when one program reduces a whole tile (the old grid), and
  0.9 with split-K (wave quantisation).
* ``B_moved``: the minimum bytes plus the activation re-reads: each weight row tile of
  the old layouts reads the fraction d of the activation it needs, ``GROUP = 8`` of them
  share it in L2 in the old Triton grid, none in the CUDA grid (77 MB of activation do
  not fit a 50 MB L2); the new grid reads the activation once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

PEAK_FLOPS = 989e12
HBM_BYTES_PER_S = 3.35e12
SMS = 132
E_BW = 0.85
M_TOKENS = 256 * 197
BLOCK = 64
ES = 2  # bf16 bytes


@dataclass(frozen=True)
class Backend:
    name: str
    e_mma: float
    shares_activation: int  # weight row tiles sharing one activation read in L2 (0: read once overall)
    split_k: bool


BACKENDS = (
    Backend("triton (this version)", 0.70, 0, True),
    Backend("triton (before)", 0.40, 8, False),
    Backend("cuda (WMMA)", 0.20, 1, False),
)


def floor_s(flops: float, nbytes: float) -> float:
    """max(F / P, B / W)."""
    return max(flops / PEAK_FLOPS, nbytes / HBM_BYTES_PER_S)


def dds_estimate(k: int, n: int, d: float, be: Backend) -> tuple[float, float]:
    """(floor, estimated time) of out (M, n) = x (M, k) @ Wᵀ with W (n, k) at density d."""
    flops = 2 * M_TOKENS * k * n * d
    act = M_TOKENS * k * ES
    minimum = act + d * k * n * ES + M_TOKENS * n * ES
    row_tiles = n / BLOCK
    reads = 1.0 if be.shares_activation == 0 else max(1.0, d * row_tiles / be.shares_activation)
    moved = minimum + (reads - 1.0) * act
    return floor_s(flops, minimum), max(flops / (PEAK_FLOPS * be.e_mma), moved / (HBM_BYTES_PER_S * E_BW))


def sdd_estimate(k: int, n: int, d: float, be: Backend) -> tuple[float, float]:
    """(floor, estimated time) of the kept blocks of dW (n, k) = dyᵀ (n, M) @ x (M, k)."""
    flops = 2 * M_TOKENS * k * n * d
    minimum = M_TOKENS * (n + k) * ES + d * k * n * ES
    nnz = d * (n / BLOCK) * (k / BLOCK)
    util = 0.9 if be.split_k else min(1.0, nnz / SMS)
    # The old kernels also pad each of the 256 images' 197 tokens to the k-step (256/197).
    waste = 1.0 if be.split_k else 256 / 197
    return floor_s(flops, minimum), max(flops * waste / (PEAK_FLOPS * be.e_mma * util), minimum / (HBM_BYTES_PER_S * E_BW))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print("ESTIMATES, not measurements: expected fraction of the roofline floor (floor / time), "
          f"ViT-B MLP, M = {M_TOKENS} tokens, bf16, block {BLOCK}, H100 SXM")
    print(f"{'layer':<5} {'density':>7} {'backend':<22} {'fwd floor us':>12} {'fwd %floor':>10} "
          f"{'fwd+bwd floor us':>16} {'fwd+bwd %floor':>14}")
    for layer, (k, n) in (("fc1", (768, 3072)), ("fc2", (3072, 768))):
        for d in (0.10, 0.25, 0.50):
            for be in BACKENDS:
                f_floor, f_time = dds_estimate(k, n, d, be)
                g_floor, g_time = dds_estimate(n, k, d, be)  # dx = dy @ W
                w_floor, w_time = sdd_estimate(k, n, d, be)
                total_floor, total_time = f_floor + g_floor + w_floor, f_time + g_time + w_time
                print(f"{layer:<5} {d:>7.0%} {be.name:<22} {1e6 * f_floor:>12.0f} {f_floor / f_time:>10.0%} "
                      f"{1e6 * total_floor:>16.0f} {total_floor / total_time:>14.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
