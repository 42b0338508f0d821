"""The triton masked-attention kernels across tile edges, against the reference.

The forward finds each row's first maximal key ``j*_i`` with two row reductions per
key tile (the tile max, then the least column where the score equals it) and keeps the
earlier tile on a tie between tiles; the dK/dV kernel works on transposed tiles (keys
on the rows); inputs whose head dim is not contiguous are copied first.  Lengths
here put the sequence just below, at and just above one and several tiles of the
interpreter (16 for N ≤ 64, 64 beyond), with batch 1, fp32/fp16/bf16, forward and
every gradient (dkeep included), and a batch element whose keep row is all zeros.
"""

from __future__ import annotations

import pytest
import torch

import sparsevit
from sparsevit import reference
from sparsevit.kernels.masked_attention import _CONFIG_TABLE, _configs, _product_kind, masked_attention_fwd
from helpers import DTYPES, device_for
from test_masked_attention import _check, _run

# (B, H, N, D): N = 15, 16, 17 (one tile and a bit), 33 (three tiles, the last with one
# key), 65 (two 64-tiles, the last with one key); D = 24 and 40 pad to 32 and 64.
SHAPES = [(1, 1, 15, 16), (1, 2, 16, 24), (2, 1, 17, 32), (1, 1, 33, 40), (2, 2, 65, 16)]


def _keep_with_dropped_row(b: int, n: int, dev: torch.device) -> torch.Tensor:
    """A soft keep mask whose first batch element drops every token (its rows attend to
    themselves and the eps terms only)."""
    keep = torch.rand(b, n, device=dev)
    keep[0] = 0.0
    return keep


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("eps", [1e-6, 0.05])
def test_tile_edges_against_reference(dtype: torch.dtype, shape: tuple, eps: float) -> None:
    b, h, n, d = shape
    dev = device_for("triton")
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    _check("triton", dtype, q, k, v, _keep_with_dropped_row(b, n, dev), eps, d ** -0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tile_edges_without_keep(dtype: torch.dtype) -> None:
    dev = device_for("triton")
    q, k, v = (torch.randn(1, 2, 33, 24, device=dev, dtype=dtype) for _ in range(3))
    _check("triton", dtype, q, k, v, None, 1e-6, 24 ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_head_dim_matches_contiguous(dtype: torch.dtype) -> None:
    """q, k, v whose head dim has stride N (views of (B, H, D, N) tensors) give exactly the
    results of their contiguous copies, forward and every gradient."""
    b, h, n, d = 2, 2, 19, 24
    dev = device_for("triton")
    q, k, v = (torch.randn(b, h, d, n, device=dev, dtype=dtype).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) == n
    keep = _keep_with_dropped_row(b, n, dev)
    grad = torch.randn(b, h, n, d, device=dev, dtype=dtype)

    def attention(a, c, e, kp):
        return sparsevit.masked_attention(a, c, e, kp, eps=1e-3, backend="triton")

    strided = _run(attention, q, k, v, keep, grad)
    compact = _run(attention, q.contiguous(), k.contiguous(), v.contiguous(), keep, grad)
    for name, a, c in zip(["out", "dq", "dk", "dv", "dkeep"], strided, compact):
        torch.testing.assert_close(a, c, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    _check("triton", dtype, q, k, v, keep, 1e-3, d ** -0.5)


@pytest.mark.parametrize("ties", [(5, 6, 20), (21, 30), (2, 40), (33, 47)], ids=str)
def test_first_argmax_over_tiles(ties: tuple) -> None:
    """Keys tied for every row's max, in one tile and across tiles (16 keys each): j* is the
    first of them, as torch.max; the max's gradient reaches that key only."""
    n, d = 48, 16
    dev = device_for("triton")
    q = torch.zeros(1, 1, n, d, device=dev)
    q[..., 0] = 1.0
    q[..., 1:] = 0.01 * torch.randn(1, 1, n, d - 1, device=dev)
    k = 0.01 * torch.randn(1, 1, n, d, device=dev)
    k[..., 1:] = 0.0  # scores depend on k[:, 0] only, so tied keys tie exactly
    for j in ties:
        k[0, 0, j, 0] = 6.0
    v = torch.randn(1, 1, n, d, device=dev)
    keep = torch.zeros(1, n, device=dev)  # all dropped: the max term carries the gradient
    scale = d ** -0.5
    _, _, _, _, jstar, _ = masked_attention_fwd(q, k, v, keep, scale, 1e-3)
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    torch.testing.assert_close(jstar, reference.first_argmax(scores), atol=0, rtol=0)
    assert (jstar == ties[0]).all()
    _check("triton", torch.float32, q, k, v, keep, 1e-3, scale)


def test_config_tables_cover_every_kernel_and_fit_the_products() -> None:
    """Every kernel has a config list for each kind of product and head-dim class;
    wgmma tiles have the 64 rows per warpgroup that wgmma needs (queries in fwd and dq,
    keys in the transposed dK/dV tiles)."""
    for name in ("fwd", "bwd_dkdv", "bwd_dq"):
        for kind in ("wgmma", "mma", "fma"):
            for block_d in (16, 32, 64, 128, 256):
                assert _configs(name, kind, block_d)
    for (name, kind, _), table in _CONFIG_TABLE.items():
        assert len(set(table)) == len(table), (name, kind)
        for bm, bn, warps, stages in table:
            assert min(bm, bn) >= 16 and warps in (2, 4, 8) and stages >= 1
            if kind == "wgmma":
                rows = bn if name == "bwd_dkdv" else bm
                assert rows >= 64, (name, bm, bn)


def test_product_kind() -> None:
    assert _product_kind(torch.float32, torch.device("cpu")) == "fma"
    assert _product_kind(torch.bfloat16, torch.device("cpu")) == "mma"
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        expected = "wgmma" if major == 9 and torch.version.hip is None else "mma"
        assert _product_kind(torch.float16, torch.device("cuda")) == expected
