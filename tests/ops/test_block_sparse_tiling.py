"""The Triton block-sparse kernels' tiling: tokens on M, index prefetch, split-K sdd, autotune keys.

Under the interpreter the kernels run one fixed config (``BLOCK_M`` 32 tokens,
``BLOCK_N = BLOCK_K = 16``), so 16-blocks run whole-block k-steps and 32-blocks two
sub-block k-steps and two column tiles per block (the prefetch's carried state across
sub-steps); sdd stacks two 16-blocks per 32-row tile.  Token counts straddle the
32-row tile; layouts have empty block rows and columns.  Accuracy rule as in
test_block_sparse_matmul.py: fp32 within the fp32 tolerances, fp16/bf16 no more than
2x the error of PyTorch's own same-dtype product, both against float64.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparsevit
from sparsevit import BlockSparseLayout, BlockSparseMatrix, reference
from helpers import DTYPES, device_for, tolerances
from test_block_sparse_matmul import _layout, _noncontiguous, _run_case

TRITON = "triton"


@pytest.fixture
def kernels():
    from sparsevit.kernels import block_sparse_matmul

    return block_sparse_matmul


def _dev() -> torch.device:
    return device_for(TRITON)


def _args(layout: BlockSparseLayout) -> tuple:
    return layout.row_indices, layout.col_indices, layout.shape


# ----------------------------------------------------------------------------------
# dds / dsd: tokens on M
# ----------------------------------------------------------------------------------
def _dds_case(layout: BlockSparseLayout, a: torch.Tensor, values: torch.Tensor, transposed: bool,
              dtype: torch.dtype) -> None:
    """``dds(a, B)`` (``B = S`` or ``Sᵀ``) on the Triton backend against the reference, forward and gradients."""

    def op(a, v):
        mat = BlockSparseMatrix(v, layout)
        return sparsevit.dds(a, mat.t() if transposed else mat, backend=TRITON)

    def ref(a, v):
        return reference.dds(a, v, *_args(layout), transposed)

    _run_case(op, ref, [a, values], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["B=S", "B=St"])
@pytest.mark.parametrize("tokens", [(1,), (33,), (2, 37)], ids=str)
def test_dds_odd_tokens(dtype: torch.dtype, transposed: bool, tokens: tuple) -> None:
    """Batch 1, a token count past one 32-row tile, batch dims; forward and both gradients."""
    dev = _dev()
    layout = _layout(3, 4, dev)  # (48, 64): an empty block row and column
    m, k = layout.shape
    a = torch.randn(*tokens, k if transposed else m, device=dev)
    _dds_case(layout, a, torch.randn(layout.nnz_blocks, 16, 16, device=dev), transposed, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["B=S", "B=St"])
def test_dds_block_32_sub_steps(dtype: torch.dtype, transposed: bool) -> None:
    """32-blocks: two k-steps per block (the prefetched entry is adopted on the second) and
    two column tiles per block; a single-block column and an empty one."""
    dev = _dev()
    mask = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 0, 1]], dtype=torch.bool)
    layout = BlockSparseLayout.from_mask(mask.to(dev), 32)  # (96, 96)
    a = _noncontiguous(torch.randn(2, 19, 96, device=dev))
    _dds_case(layout, a, torch.randn(layout.nnz_blocks, 32, 32, device=dev), transposed, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["A=S", "A=St"])
@pytest.mark.parametrize("batch", [(), (1,), (2,)], ids=str)
def test_dsd_tokens_on_m(dtype: torch.dtype, transposed: bool, batch: tuple) -> None:
    """``A @ b`` as ``(bᵀ Aᵀ)ᵀ``: b's columns (odd count) are the kernel's rows."""
    dev = _dev()
    layout = _layout(4, 3, dev)  # (64, 48)
    m, k = layout.shape
    b = torch.randn(*batch, m if transposed else k, 35, device=dev)
    values = torch.randn(layout.nnz_blocks, 16, 16, device=dev)

    def op(v, b):
        mat = BlockSparseMatrix(v, layout)
        return sparsevit.dsd(mat.t() if transposed else mat, b, backend=TRITON)

    def ref(v, b):
        return reference.dsd(v, *_args(layout), b, transposed)

    _run_case(op, ref, [values, b], dtype)


def test_empty_block_columns_write_zeros() -> None:
    """Output columns of a block column without blocks are exact zeros (every token tile)."""
    dev = _dev()
    mask = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    layout = BlockSparseLayout.from_mask(mask.to(dev), 16)
    values = torch.randn(layout.nnz_blocks, 16, 16, device=dev)
    a = torch.randn(70, 32, device=dev)
    out = sparsevit.dds(a, BlockSparseMatrix(values, layout), backend=TRITON)
    assert torch.equal(out[:, 16:], torch.zeros_like(out[:, 16:]))
    torch.testing.assert_close(out, reference.dds(a, values, *_args(layout)), **tolerances(torch.float32))


def test_batch_folded_into_tokens(kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """A (T, P, Q) input whose batch and token dims merge runs as one (1, T·P) launch; one that
    does not (a transposed view) runs the batch on grid axis 1; both match the reference."""
    launches = []
    launch = kernels._launch_dds

    def spy(values, offsets, indices, perm, transpose_blocks, a, out):
        launches.append(tuple(out.shape[:2]))
        return launch(values, offsets, indices, perm, transpose_blocks, a, out)

    monkeypatch.setattr(kernels, "_launch_dds", spy)
    dev = _dev()
    layout = _layout(3, 4, dev)
    values = torch.randn(layout.nnz_blocks, 16, 16, device=dev)
    mat = BlockSparseMatrix(values, layout).t()
    a = torch.randn(3, 7, 64, device=dev)
    tol = tolerances(torch.float32)
    torch.testing.assert_close(sparsevit.dds(a, mat, backend=TRITON), reference.dds(a, values, *_args(layout), True), **tol)
    b = torch.randn(3, 64, 7, device=dev).mT  # strides (448, 1, 7): T and P do not merge
    torch.testing.assert_close(sparsevit.dds(b, mat, backend=TRITON), reference.dds(b, values, *_args(layout), True), **tol)
    assert launches == [(1, 21), (3, 7)]


# ----------------------------------------------------------------------------------
# sdd: folded contraction and split-K
# ----------------------------------------------------------------------------------
def _sdd_operands(kind_a: str, kind_b: str, t: int, r: int, m: int, n: int, dev: torch.device):
    """``a (t, m, r)`` and ``b (t, r, n)``; ``fold``: stored so batch and contraction merge
    (a as the transpose of (t, r, m), b contiguous), ``batched``: stored so they don't."""
    a = torch.randn(t, r, m, device=dev).mT if kind_a == "fold" else torch.randn(t, m, r, device=dev)
    b = torch.randn(t, r, n, device=dev) if kind_b == "fold" else torch.randn(t, n, r, device=dev).mT
    return a, b


@pytest.mark.parametrize("kinds", [("fold", "fold"), ("batched", "fold"), ("fold", "batched"), ("batched", "batched")], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_sdd_layouts_and_splits(kernels, monkeypatch: pytest.MonkeyPatch, kinds: tuple, splits: int) -> None:
    """Every operand storage (contraction folded over the batch or not) with and without
    split-K, fp32, forward and both gradients."""
    monkeypatch.setattr(kernels, "SPLIT_K", splits)
    dev = _dev()
    layout = _layout(3, 4, dev)
    m, n = layout.shape
    a, b = _sdd_operands(*kinds, 3, 11, m, n, dev)

    def op(a, b):
        return sparsevit.sdd(a, b, layout, backend=TRITON).values

    def ref(a, b):
        return reference.sdd(a, b, layout.row_indices, layout.col_indices, 16)

    _run_case(op, ref, [a, b], torch.float32)


@pytest.mark.parametrize("dtype, block_size", [(torch.float32, 16), (torch.float16, 16), (torch.bfloat16, 16),
                                               (torch.bfloat16, 32)], ids=str)
def test_sdd_split_k_deterministic(kernels, dtype: torch.dtype, block_size: int) -> None:
    """Split-K (several splits, more splits than k-steps, none) matches the reference within
    the accuracy rule, and each split count gives the same bits on every run."""
    dev = _dev()
    layout = _layout(3, 3, dev, block_size=block_size)
    m, n = layout.shape
    a, b = _sdd_operands("fold", "fold", 2, 29, m, n, dev)  # K = 58: four 16-steps
    index = layout.index_tensors()
    col_offsets, bsc_rows, bsc_perm = index[3], index[4], index[5]
    exact = reference.sdd(a.double(), b.double(), layout.row_indices, layout.col_indices, block_size)
    same = reference.sdd(a.to(dtype), b.to(dtype), layout.row_indices, layout.col_indices, block_size)
    results = {}
    for splits in (1, 3, 7):
        runs = [kernels.sdd(a.to(dtype), b.to(dtype), col_offsets, bsc_rows, bsc_perm, block_size, splits=splits)
                for _ in range(2)]
        assert torch.equal(runs[0], runs[1]), f"splits={splits}: not the same bits on two runs"
        results[splits] = runs[0]
    for splits, got in results.items():
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), exact, **tolerances(dtype))
        else:
            err = (got.double() - exact).abs().max().item()
            base = (same.double() - exact).abs().max().item()
            floor = torch.finfo(dtype).eps * exact.abs().max().item()
            assert err <= 2 * max(base, floor), f"splits={splits}: error {err:.3g} > 2 x torch's {base:.3g}"


def test_sdd_automatic_split_k_under_interpreter(kernels) -> None:
    """The automatic choice splits a small problem (few tiles on INTERPRETER_SMS SMs) into
    several contraction ranges, bounded by the k-steps and MAX_SPLITS; large ones don't split."""
    dev = _dev()
    if kernels._interpreting():
        assert kernels.sdd_splits(4, 16, 58, dev) == 4  # cdiv(58, 16) k-steps
        want = min(kernels.MAX_SPLITS, kernels.SPLIT_TARGET_WAVES * kernels.INTERPRETER_SMS)
        assert kernels.sdd_splits(4, 16, 10_000, dev) == want
    assert kernels.sdd_splits(100_000, 16, 10_000, dev) == 1
    layout = _layout(3, 4, dev)
    m, n = layout.shape
    a, b = _sdd_operands("fold", "fold", 2, 29, m, n, dev)
    got = sparsevit.sdd(a, b, layout, backend=TRITON).values
    torch.testing.assert_close(got, reference.sdd(a, b, layout.row_indices, layout.col_indices, 16), **tolerances(torch.float32))


def test_sdd_empty_block_rows_and_columns(kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacked tiles past a column's last block, empty columns and a full column, split and not."""
    dev = _dev()
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    layout = BlockSparseLayout.from_mask(mask.to(dev), 16)  # column 1: three blocks -> two 32-row tiles
    m, n = layout.shape
    a, b = _sdd_operands("fold", "batched", 2, 9, m, n, dev)
    want = reference.sdd(a, b, layout.row_indices, layout.col_indices, 16)
    for splits in (1, 2):
        monkeypatch.setattr(kernels, "SPLIT_K", splits)
        torch.testing.assert_close(sparsevit.sdd(a, b, layout, backend=TRITON).values, want, **tolerances(torch.float32))


# ----------------------------------------------------------------------------------
# Autotune keys, configs, warm-up
# ----------------------------------------------------------------------------------
def test_autotune_keys_are_bucketed(kernels) -> None:
    """Batch sizes whose folded token counts share a power-of-two bucket share the key."""
    dev = torch.device("meta")
    layout = _layout(3, 4, torch.device("cpu"))
    index = [t.to(dev) for t in layout.index_tensors()]
    values = torch.empty(layout.nnz_blocks, 16, 16, device=dev)

    def key(batch: int) -> tuple:
        a, out = kernels._fold_rows(torch.empty(batch, 197, 48, device=dev), torch.empty(batch, 197, 64, device=dev))
        args, consts = kernels._dds_launch_args(values, index[3], index[4], index[5], True, a, out)
        return args[-2:], consts["HAS_PERM"]

    assert key(3) == key(5)  # 591 and 985 rows: bucket 1024
    assert key(5) != key(6)  # 1182 rows: bucket 2048
    assert key(6)[0][0] == 2048


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_config_invariants(kernels, block_size: int, dtype: torch.dtype) -> None:
    """Tokens-on-M tiles of 64/128 rows for every block size, N and K tiles that divide the
    block (dds), pipeline buffers within the sm_80 shared-memory budget."""
    size = torch.empty((), dtype=dtype).element_size()
    for gen, dds in ((kernels._dds_configs, True), (kernels._sdd_configs, False)):
        configs = gen(block_size, dtype)
        assert configs
        for cfg in configs:
            bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            assert bm in (64, 128) and block_size % bn == 0 and bn >= 16
            assert not dds or block_size % bk == 0
            assert cfg.num_stages * (bm + bn) * bk * size <= kernels._SMEM_BUDGET


def test_warm_up_runs(kernels) -> None:
    """The warm-up helper runs the three launches of a Linear layer (here tiny, fp32)."""
    kernels.warm_up(48, 32, 16, 5, dtype=torch.float32, device=_dev())


# ----------------------------------------------------------------------------------
# GPU compile (no GPU needed)
# ----------------------------------------------------------------------------------
COMPILE_SCRIPT = r'''
import re, sys
import torch, triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from sparsevit.kernels import block_sparse_matmul as K

try:  # the JIT's own specialisation of an argument (Triton 3.3+)
    from triton._C.libtriton import native_specialize_impl

    def specialize(kp, val):
        return native_specialize_impl(BaseBackend, val, kp.is_const, not kp.do_not_specialize,
                                      not kp.do_not_specialize_on_alignment)
except ImportError:  # the same rules, spelt out
    TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32"}

    def specialize(kp, val):
        if isinstance(val, torch.Tensor):
            return "*" + TYPES[val.dtype], "D"
        if val == 1 and not kp.do_not_specialize:
            return "constexpr", 1
        kind = "i32" if -2**31 <= val < 2**31 else "i64"
        return kind, "D" if val % 16 == 0 and not kp.do_not_specialize else None

def meta(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")

def compile_launch(fn, args, consts, cfg, arch):
    sig, cx, attrs = {}, dict(consts, **cfg.kwargs), {}
    runtime = [n for n in fn.arg_names if n not in cx]
    for name, val in zip(runtime, args):
        kind, attr = specialize(fn.params[fn.arg_names.index(name)], val)
        sig[name] = kind
        if kind == "constexpr":
            cx[name] = attr
        elif attr:
            attrs[(fn.arg_names.index(name),)] = BaseBackend.parse_attr(attr)
    sig = {n: sig.get(n, "constexpr") for n in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in cx.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

bs = int(sys.argv[1])
nnz = (768 // bs) * (3072 // bs) // 2
values, idx = meta((nnz, bs, bs)), meta((nnz,), torch.int32)
a, out = K._fold_rows(meta((256, 197, 768)), meta((256, 197, 3072)))
dds = K._dds_launch_args(values, meta((3072 // bs + 1,), torch.int32), idx, None, False, a, out)
a, b = K._fold_contraction(meta((256, 197, 3072)).transpose(1, 2), meta((256, 197, 768)))
sdd = K._sdd_launch_args(a, b, meta((768 // bs + 1,), torch.int32), idx, idx, bs, meta((4, nnz, bs, bs), torch.float32), True)
for name, fn, (args, consts), cfg in (("dds", K._dds_kernel, dds, K._dds_configs(bs)[-1]),
                                      ("sdd", K._sdd_kernel, sdd, K._sdd_configs(bs)[-1])):
    for arch in (90, 80):
        c = compile_launch(fn, args, consts, cfg, arch)
        bufs = [int(n) for n in re.findall(r"local_alloc[^\n]*?: \(\) -> !ttg\.memdesc<(\d+)x", c.asm["ttgir"])]
        assert c.asm.get("cubin"), "no cubin"
        assert c.metadata.shared <= (227 if arch == 90 else 163) * 1024, c.metadata.shared
        if arch == 90:
            assert "wgmma" in c.asm["ptx"], (name, bs, cfg)
            assert bufs and min(bufs) >= cfg.num_stages - 1, (name, bs, cfg, bufs)
        print("compiled", name, bs, arch, cfg, bufs, c.metadata.shared)
'''


@pytest.mark.parametrize("block_size", [16, 128])
def test_kernels_compile_to_wgmma_for_sm90(block_size: int) -> None:
    """dds and sdd for ViT-B fc1 shapes (bf16, the largest config) compile for sm_90 with
    ``wgmma`` and a multi-buffered pipeline, and for sm_80, without a GPU (in a subprocess:
    the test session runs Triton in interpreter mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(block_size)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("compiled") == 4, done.stdout
