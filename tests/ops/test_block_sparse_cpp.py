"""The C++ CPU kernels (backend ``cpp``) of dds / dsd / sdd against the float64 reference.

Forward and every gradient through the ops' autograd (which runs the other two products
on the same backend), every product and transpose, block sizes 16-128, odd token
counts, batch 1, empty block rows and columns, empty and full layouts, the operand
strides each kernel treats differently (read in place, repacked, made contiguous),
fp32 / bf16 / fp16; thread-count independence and run-to-run determinism; the backend
choice; and errors on bad input, including index tensors that would read out of bounds.

Accuracy rule (as in test_block_sparse_matmul.py): fp32 within the fp32 tolerances;
fp16/bf16 no more than 2x the error of PyTorch's own same-dtype product, both measured
against the reference in float64.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

import sparsevit
from sparsevit import BlockSparseLayout, BlockSparseMatrix, reference
from sparsevit.backend import choose_backend
from sparsevit.nn import BlockSparseLinear
from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
from helpers import DTYPES, require_backend, tolerances

CPP = "cpp"


@pytest.fixture(autouse=True)
def _cpp_available() -> None:
    require_backend(CPP)


def _mask(mb: int, kb: int, kind: str) -> torch.Tensor:
    """``mixed``: an empty first block row and last block column, BSC order != BSR order."""
    if kind == "dense":
        return torch.ones(mb, kb, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(mb, kb, dtype=torch.bool)
    i = torch.arange(mb)[:, None]
    j = torch.arange(kb)[None, :]
    return (i > 0) & (j < kb - 1) & ((i + 2 * j) % 3 != 2)


def _layout(bs: int, kind: str = "mixed") -> BlockSparseLayout:
    mb, kb = (3, 4) if bs <= 32 else (3, 3) if bs == 64 else (2, 3)
    return BlockSparseLayout.from_mask(_mask(mb, kb, kind), bs)


def _check(name: str, got: torch.Tensor, same: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == exact.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    if exact.numel() == 0:
        return
    scale = exact.abs().max().item()
    if dtype == torch.float32:
        tol = tolerances(dtype)
        torch.testing.assert_close(got.double(), exact, atol=tol["atol"] * max(1.0, scale), rtol=tol["rtol"],
                                   msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - exact).abs().max().item()
    base = (same.double() - exact).abs().max().item()
    floor = torch.finfo(dtype).eps * scale
    assert err <= 2 * max(base, floor), f"{name}: error {err:.3g} > 2 x torch's {base:.3g} (floor {floor:.3g})"


def _run_case(op: Callable, ref: Callable, inputs: list[torch.Tensor], dtype: torch.dtype,
              views: Callable = lambda *ts: ts) -> None:
    """Output and the gradient of every input: ``op`` on the cpp backend vs ``ref`` in float64.

    ``views`` maps the leaves to the (possibly strided) tensors both functions get.
    """
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = op(*views(*leaves))
    same = [t.detach().clone().requires_grad_() for t in leaves]
    out_same = ref(*views(*same))
    exact = [t.detach().double().requires_grad_() for t in leaves]
    out_exact = ref(*views(*exact))
    _check("out", out, out_same.detach(), out_exact.detach(), dtype)
    grad = torch.randn_like(out_exact)
    out.backward(grad.to(dtype))
    out_same.backward(grad.to(dtype))
    out_exact.backward(grad)
    for i, (g, s, e) in enumerate(zip(leaves, same, exact)):
        _check(f"grad[{i}]", g.grad, s.grad, e.grad, dtype)


BLOCK_SIZES = [16, 32, 64, 128]
KINDS = ["mixed", "dense", "empty"]
BATCHES = [(2,), (1,), ()]  # batch dims before (tokens, features)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["B=S", "B=St"])
def test_dds(block_size: int, kind: str, dtype: torch.dtype, transposed: bool) -> None:
    layout = _layout(block_size, kind)
    m, k = layout.shape
    q = k if transposed else m
    values = torch.randn(layout.nnz_blocks, block_size, block_size)
    args = (layout.row_indices, layout.col_indices, layout.shape)
    for batch in BATCHES:
        a = torch.randn(*batch, 37, q)  # 37 tokens: not a tile multiple

        def op(a, v):
            mat = BlockSparseMatrix(v, layout)
            return sparsevit.dds(a, mat.t() if transposed else mat, backend=CPP)

        _run_case(op, lambda a, v: reference.dds(a, v, *args, transposed), [a, values], dtype)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["A=S", "A=St"])
def test_dsd(block_size: int, kind: str, dtype: torch.dtype, transposed: bool) -> None:
    layout = _layout(block_size, kind)
    m, k = layout.shape
    q = m if transposed else k
    values = torch.randn(layout.nnz_blocks, block_size, block_size)
    args = (layout.row_indices, layout.col_indices, layout.shape)
    for batch in BATCHES:
        b = torch.randn(*batch, q, 29)  # N = 29 columns

        def op(v, b):
            mat = BlockSparseMatrix(v, layout)
            return sparsevit.dsd(mat.t() if transposed else mat, b, backend=CPP)

        _run_case(op, lambda v, b: reference.dsd(v, *args, b, transposed), [values, b], dtype)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("a_major", ["tokens", "features"])
def test_sdd(block_size: int, kind: str, dtype: torch.dtype, a_major: str) -> None:
    """a as the transpose of a token-major tensor (a weight gradient: repacked) or row-major (read in place)."""
    layout = _layout(block_size, kind)
    m, n = layout.shape
    ref = lambda a, b: reference.sdd(a, b, layout.row_indices, layout.col_indices, block_size)  # noqa: E731
    op = lambda a, b: sparsevit.sdd(a, b, layout, backend=CPP).values  # noqa: E731
    for batch in BATCHES:
        b = torch.randn(*batch, 41, n)
        if a_major == "tokens":
            a = torch.randn(*batch, 41, m)
            _run_case(op, ref, [a, b], dtype, views=lambda a, b: (a.mT, b))
        else:
            _run_case(op, ref, [torch.randn(*batch, m, 41), b], dtype)


# ----------------------------------------------------------------------------------
# Strides: each kernel reads some operands in place and repacks or copies others.
# ----------------------------------------------------------------------------------
STRIDED = {
    # row-major with a leading dimension wider than the row: read in place
    "wide_rows": lambda t: torch.cat([t, torch.randn_like(t)], dim=-1)[..., : t.shape[-1]],
    # the transpose of a contiguous tensor
    "transposed": lambda t: t.mT.contiguous().mT,
    # every other row of a taller tensor (batch strides that do not fold)
    "every_other_row": lambda t: torch.stack([t, torch.randn_like(t)], dim=-2).flatten(-3, -2)[..., ::2, :],
    # a broadcast (stride 0) batch
    "expanded": lambda t: t[:1].expand_as(t),
}


@pytest.mark.parametrize("layout_kind", ["mixed", "dense"])
@pytest.mark.parametrize("stride", list(STRIDED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_operands(layout_kind: str, stride: str, dtype: torch.dtype) -> None:
    layout = _layout(32, layout_kind)
    m, k = layout.shape
    args = (layout.row_indices, layout.col_indices, layout.shape)
    values = torch.randn(layout.nnz_blocks, 32, 32)
    view = STRIDED[stride]
    _run_case(lambda a, v: sparsevit.dds(a, BlockSparseMatrix(v, layout).t(), backend=CPP),
              lambda a, v: reference.dds(a, v, *args, True), [torch.randn(3, 23, k), values], dtype,
              views=lambda a, v: (view(a), v))
    _run_case(lambda v, b: sparsevit.dsd(BlockSparseMatrix(v, layout), b, backend=CPP),
              lambda v, b: reference.dsd(v, *args, b), [values, torch.randn(3, k, 19)], dtype,
              views=lambda v, b: (v, view(b)))
    _run_case(lambda a, b: sparsevit.sdd(a, b, layout, backend=CPP).values,
              lambda a, b: reference.sdd(a, b, layout.row_indices, layout.col_indices, 32),
              [torch.randn(3, m, 23), torch.randn(3, 23, k)], dtype, views=lambda a, b: (view(a), view(b)))


def test_many_tiles_and_blocks_per_group() -> None:
    """Shapes past one tile in every kernel (several token tiles in dds, column tiles in dsd,
    contraction chunks and full block-row groups in sdd), fp32."""
    layout = BlockSparseLayout.from_mask(torch.rand(3, 12) < 0.8, 16)  # rows of up to 12 blocks
    m, k = layout.shape
    args = (layout.row_indices, layout.col_indices, layout.shape)
    values = torch.randn(layout.nnz_blocks, 16, 16)
    _run_case(lambda a, v: sparsevit.dds(a, BlockSparseMatrix(v, layout), backend=CPP),
              lambda a, v: reference.dds(a, v, *args), [torch.randn(2, 1100, m), values], torch.float32)
    _run_case(lambda v, b: sparsevit.dsd(BlockSparseMatrix(v, layout), b, backend=CPP),
              lambda v, b: reference.dsd(v, *args, b), [values, torch.randn(2, k, 1300)], torch.float32)
    _run_case(lambda a, b: sparsevit.sdd(a, b, layout, backend=CPP).values,
              lambda a, b: reference.sdd(a, b, layout.row_indices, layout.col_indices, 16),
              [torch.randn(2, 700, m), torch.randn(2, 700, k)], torch.float32, views=lambda a, b: (a.mT, b))
    _run_case(lambda a, b: sparsevit.sdd(a, b, layout, backend=CPP).values,  # b transposed: repacked
              lambda a, b: reference.sdd(a, b, layout.row_indices, layout.col_indices, 16),
              [torch.randn(2, m, 700), torch.randn(2, k, 700)], torch.float32, views=lambda a, b: (a, b.mT))


# ----------------------------------------------------------------------------------
# BlockSparseLinear on the cpp backend
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_linear_matches_masked_linear(block_size: int, dtype: torch.dtype) -> None:
    """y, dx, dW (kept blocks) and dbias of BlockSparseLinear equal those of the masked nn.Linear."""
    dense = nn.Linear(3 * block_size, 2 * block_size)
    layer = BlockSparseLinear.from_dense(dense, block_size=block_size, sparsity=0.5, backend=CPP).to(dtype)
    lay = layer.layout
    masked = layer.to_dense()  # dtype, zeros outside the kept blocks
    exact = layer.to_dense().double()
    x = torch.randn(2, 37, 3 * block_size)
    xs, xm, xe = (x.to(t).clone().requires_grad_() for t in (dtype, dtype, torch.float64))
    y, ym, ye = layer(xs), masked(xm), exact(xe)
    _check("y", y, ym.detach(), ye.detach(), dtype)
    g = torch.randn_like(ye)
    for out, grad in ((y, g.to(dtype)), (ym, g.to(dtype)), (ye, g)):
        out.backward(grad)
    _check("dx", xs.grad, xm.grad, xe.grad, dtype)
    _check("dbias", layer.bias.grad, masked.bias.grad, exact.bias.grad, dtype)
    kept = lambda w: reference.dense_to_block_sparse(w, lay.row_indices, lay.col_indices, block_size)  # noqa: E731
    _check("dW", layer.weight.grad, kept(masked.weight.grad), kept(exact.weight.grad), dtype)


def test_block_sparse_linear_uses_cpp_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no backend given, the layer's forward and backward run the C++ CPU kernels."""
    import sparsevit.ops.block_sparse_matmul as bsm

    layer = BlockSparseLinear(64, 96, sparsity=0.5, block_size=32)
    x = torch.randn(5, 64, requires_grad=True)
    seen = []
    original = bsm._native

    def spy(name: str, backend: str):
        seen.append((name, backend))
        return original(name, backend)

    monkeypatch.setattr(bsm, "_native", spy)
    layer(x).sum().backward()
    assert sorted(set(seen)) == [("dds", CPP), ("sdd", CPP)]
    torch.testing.assert_close(layer(x), layer.to_dense()(x), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------
# Threads and determinism
# ----------------------------------------------------------------------------------
def _all_products(layout: BlockSparseLayout, x: torch.Tensor, values: torch.Tensor, g: torch.Tensor) -> list:
    mat = BlockSparseMatrix(values, layout)
    return [
        sparsevit.dds(x, mat.t(), backend=CPP),
        sparsevit.dds(g, mat, backend=CPP),
        sparsevit.dsd(mat, x.mT, backend=CPP),
        sparsevit.dsd(mat.t(), g.mT, backend=CPP),
        sparsevit.sdd(g.mT, x, layout, backend=CPP).values,
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_counts_and_repeated_runs_agree_bitwise(dtype: torch.dtype) -> None:
    """The tiles and every sum's order depend on the shapes only, never on the thread count."""
    layout = BlockSparseLayout.random((256, 192), 32, 0.5)
    x = torch.randn(3, 301, 192, dtype=dtype)
    g = torch.randn(3, 301, 256, dtype=dtype)
    values = torch.randn(layout.nnz_blocks, 32, 32, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_products(layout, x, values, g)
        torch.set_num_threads(2)
        two = _all_products(layout, x, values, g)
        again = _all_products(layout, x, values, g)
    finally:
        torch.set_num_threads(threads)
    for i, (a, b, c) in enumerate(zip(one, two, again)):
        assert torch.equal(b, c), f"product {i}: two runs at 2 threads differ"
        assert torch.equal(a, b), f"product {i}: 1 and 2 threads differ by {(a - b).abs().max().item():.3g}"


# ----------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------
def test_cpp_is_the_cpu_default_and_env_selects_it(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 32)
    for dtype in DTYPES:
        assert choose_backend(BLOCK_SPARSE_SUPPORT, [x.to(dtype)]) == CPP
    monkeypatch.setenv("SPARSEVIT_BACKEND", CPP)
    assert choose_backend(BLOCK_SPARSE_SUPPORT, [x]) == CPP
    from sparsevit.ops.masked_softmax import MASKED_SOFTMAX_SUPPORT

    with pytest.raises(sparsevit.BackendUnavailableError, match="has no cpp implementation"):
        choose_backend(MASKED_SOFTMAX_SUPPORT, [x])


def test_missing_cpu_kernels_fall_back_to_torch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import sparsevit.backend as backend_mod

    reason = "sparsevit._C was built without the C++ CPU kernels (test)"
    monkeypatch.setattr(backend_mod, "CPU_KERNELS_ERROR", reason)
    x = torch.randn(4, 32)
    assert choose_backend(BLOCK_SPARSE_SUPPORT, [x]) == "torch"
    with pytest.raises(sparsevit.BackendUnavailableError, match="cpp.*built without the C\\+\\+ CPU kernels"):
        choose_backend(BLOCK_SPARSE_SUPPORT, [x], CPP)
    sparsevit.backends()
    out = capsys.readouterr().out
    assert f"cpp     | no: {reason}" in out


def test_kernel_presence_is_detected_per_op() -> None:
    """An extension without a set of kernels (an older or CPU-only build) is a reason, not an error."""
    from sparsevit import _extension

    assert _extension._kernels_error("sparsevit::dds_cpp", "CPU", "C++ CPU kernels", "how") is None
    reason = _extension._kernels_error("sparsevit::no_such_op", "CPU", "C++ CPU kernels", "rebuild")
    assert reason == "sparsevit._C was built without the C++ CPU kernels (rebuild)"


def test_table_shows_cpp() -> None:
    rows = {s.name: s for s in sparsevit.backend.backend_status()}
    assert rows[CPP].cpu is None
    assert "needs CPU tensors" in rows[CPP].cuda or "no CUDA device" in rows[CPP].cuda
    assert "C++ CPU kernels yes" in sparsevit.backend_table()


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------
def test_public_errors_match_other_backends() -> None:
    layout = BlockSparseLayout.random((32, 48), 16, 0.5)
    mat = BlockSparseMatrix(torch.randn(layout.nnz_blocks, 16, 16), layout)
    for backend in (CPP, "torch"):
        with pytest.raises(ValueError, match="must agree on Q"):
            sparsevit.dds(torch.randn(4, 48), mat, backend=backend)
        with pytest.raises(TypeError, match="same dtype"):
            sparsevit.dds(torch.randn(4, 32, dtype=torch.bfloat16), mat, backend=backend)
        with pytest.raises(TypeError, match="a must be float32, float16 or bfloat16"):
            sparsevit.dds(torch.randn(4, 32).double(), mat, backend=backend)
        with pytest.raises(ValueError, match="must agree on R"):
            sparsevit.sdd(torch.randn(32, 3), torch.randn(4, 48), layout, backend=backend)


_INDEX = ("row_offsets", "col_indices", "row_indices", "col_offsets", "bsc_row_indices", "bsc_perm")


@pytest.mark.parametrize(
    "name, value, product, message",
    [
        ("col_indices", 99, "dds_t", "indices must lie in"),
        ("bsc_row_indices", -1, "dds", "indices must lie in"),
        ("bsc_perm", 1000, "dds", "perm must lie in"),
        ("row_offsets", 1, "dsd", "offsets must run from 0"),
        ("col_offsets", 1000, "dsd_t", "offsets must run from 0"),
        ("row_indices", 77, "sdd", "outside the"),
    ],
)
def test_inconsistent_index_is_an_error_not_a_crash(name: str, value: int, product: str, message: str) -> None:
    """Index tensors that would read out of bounds, given to the custom ops (which take raw
    index lists: BlockSparseLayout validates its own), are a ValueError from the kernel."""
    layout = BlockSparseLayout.random((64, 48), 16, 0.5)
    index = [t.clone() for t in layout.index_tensors()]
    index[_INDEX.index(name)][-1] = value
    values = torch.randn(layout.nnz_blocks, 16, 16)
    ops = torch.ops.sparsevit
    with pytest.raises(ValueError, match=message):
        if product == "dds":
            ops.dds(torch.randn(5, 64), values, index, False, CPP)
        elif product == "dds_t":
            ops.dds(torch.randn(5, 48), values, index, True, CPP)
        elif product == "dsd":
            ops.dsd(values, index, torch.randn(48, 5), False, CPP)
        elif product == "dsd_t":
            ops.dsd(values, index, torch.randn(64, 5), True, CPP)
        else:
            ops.sdd(torch.randn(64, 5), torch.randn(5, 48), index, 16, CPP)


def test_kernel_arguments_are_checked() -> None:
    """The C++ ops validate what the Python layer normally guarantees."""
    ops = torch.ops.sparsevit
    layout = BlockSparseLayout.random((32, 48), 16, 0.5)
    values = torch.randn(layout.nnz_blocks, 16, 16)
    off, idx = layout.row_offsets, layout.col_indices
    a = torch.randn(1, 5, 48)
    assert ops.dds_cpp(a, values, off, idx, None, True, 32).shape == (1, 5, 32)
    with pytest.raises(TypeError, match="offsets must be int32"):
        ops.dds_cpp(a, values, off.long(), idx, None, True, 32)
    with pytest.raises(ValueError, match="offsets must have 4 entries"):
        ops.dds_cpp(a, values, off, idx, None, True, 48)
    with pytest.raises(ValueError, match="values must be contiguous"):
        ops.dds_cpp(a, values.mT, off, idx, None, True, 32)
    with pytest.raises(ValueError, match="block size must be 16, 32, 64 or 128"):
        ops.dds_cpp(a, torch.randn(layout.nnz_blocks, 8, 8), off, idx, None, True, 32)
    with pytest.raises(ValueError, match="a must be a 3-D tensor"):
        ops.dds_cpp(a[0], values, off, idx, None, True, 32)
    with pytest.raises(TypeError, match="must share a dtype"):
        ops.dds_cpp(a.bfloat16(), values, off, idx, None, True, 32)
    with pytest.raises(TypeError, match="supports float32, bfloat16 and float16"):
        ops.dds_cpp(a.double(), values.double(), off, idx, None, True, 32)
    with pytest.raises(ValueError, match="multiple of the block size"):
        ops.dsd_cpp(values, off, idx, None, False, torch.randn(1, 40, 3), 32)
    with pytest.raises(ValueError, match="disagree"):
        ops.sdd_cpp(torch.randn(1, 32, 4), torch.randn(1, 5, 48), layout.row_indices, idx, 16)
    with pytest.raises(ValueError, match="differ in length"):
        ops.sdd_cpp(torch.randn(1, 32, 4), torch.randn(1, 4, 48), layout.row_indices[:-1], idx, 16)
