"""Property tests of the block-sparse products and their types, every backend.

``dds`` (``a @ B``), ``dsd`` (``A @ b``) and ``sdd`` (the kept blocks of ``Σ_batch a @ b``),
block-granular RigL sparsity (Evci et al. 2020), are compared on generated cases with
:mod:`sparsevit.reference` evaluated in float64, forward and every gradient.  Cases
cover block sizes 16 and 32, empty / full / random layouts and layouts with empty
block rows and columns, the transposed sparse operand, batch dims (including an empty
batch), free dims of 0 and sizes that are not a tile multiple, a zero-length
contraction in ``sdd``, and dense operands stored transposed, sliced or broadcast.

:class:`BlockSparseLayout` and :class:`BlockSparseMatrix` get structural properties:
the BSR/BSC index is the mask's, round trips are exact, and a layout built from
corrupted index tensors is refused with a ValueError before any kernel reads it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import sparsevit
from sparsevit import BlockSparseLayout, BlockSparseMatrix, reference
from sparsevit.layout import kept_blocks
from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
from strategies import (
    DEVICE,
    DTYPES,
    Stride,
    assert_matches,
    backend_params,
    backends_for,
    device_for,
    examples,
    expected_backends,
    generator,
    operand,
    randn,
    run_fwd_bwd,
    strides,
)

BACKENDS = backend_params(BLOCK_SPARSE_SUPPORT)
MASK_KINDS = ("random", "empty", "full", "gaps")


def test_expected_backends_are_available() -> None:
    missing = set(expected_backends(BLOCK_SPARSE_SUPPORT)) - set(backends_for(BLOCK_SPARSE_SUPPORT))
    assert not missing, f"block-sparse ops: backends {sorted(missing)} cannot run here; see sparsevit.backend_table()"


# ----------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutCase:
    """An ``(mb·bs, kb·bs)`` layout: ``bits`` (row-major) under ``kind`` (``gaps`` clears
    the first block row and the last block column)."""

    block_size: int
    mb: int
    kb: int
    kind: str
    bits: tuple

    def mask(self) -> torch.Tensor:
        if self.kind == "empty":
            return torch.zeros(self.mb, self.kb, dtype=torch.bool)
        if self.kind == "full":
            return torch.ones(self.mb, self.kb, dtype=torch.bool)
        mask = torch.tensor(self.bits, dtype=torch.bool).view(self.mb, self.kb)
        if self.kind == "gaps":
            mask[0] = False
            mask[:, -1] = False
        return mask

    def layout(self, device: torch.device = DEVICE) -> BlockSparseLayout:
        return BlockSparseLayout.from_mask(self.mask().to(device), self.block_size)


@st.composite
def layout_cases(draw, max_blocks: int = 3) -> LayoutCase:
    block_size = draw(st.sampled_from([16, 16, 32]))
    top = max_blocks if block_size == 16 else 2
    mb, kb = draw(st.integers(1, top)), draw(st.integers(1, top))
    bits = tuple(draw(st.lists(st.booleans(), min_size=mb * kb, max_size=mb * kb)))
    return LayoutCase(block_size, mb, kb, draw(st.sampled_from(MASK_KINDS)), bits)


@dataclass(frozen=True)
class ProductCase:
    """One product: the layout, batch dims ``lead``, the free dim ``free`` (P of dds, N
    of dsd, the contraction R of sdd), the sparse operand transposed or not."""

    layout: LayoutCase
    lead: tuple
    free: int
    transposed: bool
    dtype: torch.dtype
    dense_stride: Stride
    dense2_stride: Stride
    values_stride: Stride
    seed: int


@st.composite
def product_cases(draw) -> ProductCase:
    lead = draw(st.sampled_from([(), (), (1,), (2,), (0,), (2, 1)]))
    nd = len(lead) + 2
    dense = strides(nd, expandable=tuple(range(len(lead))) + (nd - 2,), transposable=((nd - 2, nd - 1),))
    return ProductCase(
        layout=draw(layout_cases()),
        lead=lead,
        free=draw(st.sampled_from([0, 1, 5, 7, 13, 20])),
        transposed=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        dense_stride=draw(dense),
        dense2_stride=draw(dense),
        values_stride=draw(strides(3, expandable=(0,), transposable=((1, 2),))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _case(kind: str, lead: tuple, free: int, transposed: bool = False, dtype=torch.float32, bs: int = 16) -> ProductCase:
    lay = LayoutCase(bs, 2, 3, kind, (True, False, True, False, True, True))
    return ProductCase(lay, lead, free, transposed, dtype, Stride(), Stride(), Stride(), 5)


def _values(case: ProductCase, layout: BlockSparseLayout):
    bs = layout.block_size
    values = randn(generator(case.seed + 1), layout.nnz_blocks, bs, bs, device=layout.device)
    return operand(values, case.values_stride, case.dtype)


def _check_all(names: tuple, got: list, own: list, truth: list, dtype: torch.dtype) -> None:
    assert got[0].dtype == dtype, f"out dtype {got[0].dtype} != {dtype}"
    for name, g, o, t in zip(names, got, own, truth):
        assert_matches(name, g, t, dtype, own=o)


# ----------------------------------------------------------------------------------
# dds: out = a @ B, B = S or Sᵀ
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@examples(40)
@given(case=product_cases())
@example(case=_case("gaps", (2,), 7, transposed=True))
@example(case=_case("random", (), 0))  # P = 0 (no tokens): the backward's sdd has R = 0
@example(case=_case("empty", (0,), 5, dtype=torch.bfloat16))
def test_dds(backend: str, case: ProductCase) -> None:
    dev = device_for(backend)
    layout = case.layout.layout(dev)
    m, k = layout.shape
    q = k if case.transposed else m
    gen = generator(case.seed)
    a = operand(randn(gen, *case.lead, case.free, q, device=dev), case.dense_stride, case.dtype)
    values = _values(case, layout)
    grad = randn(gen, *case.lead, case.free, m if case.transposed else k, device=dev).to(case.dtype).double()

    def op(a_, v_):
        mat = BlockSparseMatrix(v_, layout)
        return sparsevit.dds(a_, mat.t() if case.transposed else mat, backend=backend)

    def ref(a_, v_):
        return reference.dds(a_, v_, layout.row_indices, layout.col_indices, layout.shape, case.transposed)

    runs = [run_fwd_bwd(fn, ins, g) for fn, ins, g in
            zip((op, ref, ref), zip(a.inputs(), values.inputs()), (grad, grad, grad.double()))]
    assert runs[0][0].is_contiguous()
    _check_all(("out", "da", "dvalues"), *runs, case.dtype)


# ----------------------------------------------------------------------------------
# dsd: out = A @ b, A = S or Sᵀ
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@examples(40)
@given(case=product_cases())
@example(case=_case("gaps", (2,), 7, transposed=True))
@example(case=_case("random", (), 0))  # N = 0 columns
@example(case=_case("full", (0,), 5, dtype=torch.float16))
def test_dsd(backend: str, case: ProductCase) -> None:
    dev = device_for(backend)
    layout = case.layout.layout(dev)
    m, k = layout.shape
    q = m if case.transposed else k
    gen = generator(case.seed)
    b = operand(randn(gen, *case.lead, q, case.free, device=dev), case.dense_stride, case.dtype)
    values = _values(case, layout)
    grad = randn(gen, *case.lead, k if case.transposed else m, case.free, device=dev).to(case.dtype).double()

    def op(v_, b_):
        mat = BlockSparseMatrix(v_, layout)
        return sparsevit.dsd(mat.t() if case.transposed else mat, b_, backend=backend)

    def ref(v_, b_):
        return reference.dsd(v_, layout.row_indices, layout.col_indices, layout.shape, b_, case.transposed)

    runs = [run_fwd_bwd(fn, ins, g) for fn, ins, g in
            zip((op, ref, ref), zip(values.inputs(), b.inputs()), (grad, grad, grad.double()))]
    assert runs[0][0].is_contiguous()
    _check_all(("out", "dvalues", "db"), *runs, case.dtype)


# ----------------------------------------------------------------------------------
# sdd: the kept blocks of Σ_batch a @ b
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@examples(40)
@given(case=product_cases())
@example(case=_case("gaps", (2,), 7))
@example(case=_case("random", (), 0))  # zero-length contraction: all-zero blocks
@example(case=_case("random", (3,), 0, dtype=torch.bfloat16))
@example(case=_case("full", (0,), 5))  # empty batch: all-zero blocks
def test_sdd(backend: str, case: ProductCase) -> None:
    dev = device_for(backend)
    layout = case.layout.layout(dev)
    m, n = layout.shape
    gen = generator(case.seed)
    a = operand(randn(gen, *case.lead, m, case.free, device=dev), case.dense_stride, case.dtype)
    b = operand(randn(gen, *case.lead, case.free, n, device=dev), case.dense2_stride, case.dtype)
    bs = layout.block_size
    grad = randn(gen, layout.nnz_blocks, bs, bs, device=dev).to(case.dtype).double()

    def op(a_, b_):
        out = sparsevit.sdd(a_, b_, layout, backend=backend)
        assert isinstance(out, BlockSparseMatrix) and out.layout == layout
        return out.values

    def ref(a_, b_):
        return reference.sdd(a_, b_, layout.row_indices, layout.col_indices, bs)

    runs = [run_fwd_bwd(fn, ins, g) for fn, ins, g in
            zip((op, ref, ref), zip(a.inputs(), b.inputs()), (grad, grad, grad.double()))]
    _check_all(("values", "da", "db"), *runs, case.dtype)
    if case.free == 0 or 0 in case.lead:  # an empty sum: exact zeros
        assert runs[0][0].abs().sum() == 0, "an empty contraction must give zero blocks"


# ----------------------------------------------------------------------------------
# BlockSparseLayout and BlockSparseMatrix
# ----------------------------------------------------------------------------------
@examples(40)
@given(case=layout_cases(max_blocks=4))
def test_layout_index_is_the_mask(case: LayoutCase) -> None:
    """BSR and BSC index tensors describe exactly the mask; rebuilding from them is equal."""
    mask = case.mask()
    layout = BlockSparseLayout.from_mask(mask.to(DEVICE), case.block_size)
    assert layout.shape == (case.mb * case.block_size, case.kb * case.block_size)
    assert layout.nnz_blocks == int(mask.sum())
    assert torch.equal(layout.to_mask().cpu(), mask)
    assert all(t.dtype == torch.int32 for t in layout.index_tensors())
    ro, ci, ri, co, bri, perm = (t.cpu().tolist() for t in layout.index_tensors())
    packed = [(i, j) for i in range(case.mb) for j in range(case.kb) if mask[i, j]]  # row-major
    assert list(zip(ri, ci)) == packed
    assert ro == [sum(1 for i, _ in packed if i < r) for r in range(case.mb + 1)]
    assert co == [sum(1 for _, j in packed if j < c) for c in range(case.kb + 1)]
    by_column = sorted(range(len(packed)), key=lambda t: (packed[t][1], packed[t][0]))  # column-major
    assert perm == by_column
    assert bri == [packed[t][0] for t in by_column]
    rebuilt = BlockSparseLayout(layout.shape, layout.block_size, *layout.index_tensors())
    assert rebuilt == layout and hash(rebuilt) == hash(layout)
    assert pickle.loads(pickle.dumps(layout)) == layout
    assert layout.validate() is layout


@dataclass(frozen=True)
class Corruption:
    layout: LayoutCase
    tensor: int  # which of the six index tensors
    position: int  # which entry (modulo its length)
    value: str  # "out_of_range", "negative", "neighbour" (± 1) or "int64"


@st.composite
def corruptions(draw) -> Corruption:
    lay = draw(layout_cases())
    return Corruption(lay, draw(st.integers(0, 5)), draw(st.integers(0, 100)),
                      draw(st.sampled_from(["out_of_range", "negative", "neighbour", "int64"])))


@pytest.mark.parametrize("backend", BACKENDS)
@examples(25)
@given(c=corruptions())
@example(c=Corruption(LayoutCase(16, 2, 2, "full", (True,) * 4), 1, 0, "out_of_range"))  # col_indices = 1000
def test_corrupted_layout_is_refused(backend: str, c: Corruption) -> None:
    """A layout built from user index tensors with one bad entry raises ValueError before
    any kernel reads it (never a crash, an out-of-bounds read or a silent result)."""
    dev = device_for(backend)
    good = c.layout.layout(dev)
    index = [t.clone() for t in good.index_tensors()]
    t = index[c.tensor]
    assume(t.numel() > 0)
    pos = c.position % t.numel()
    if c.value == "out_of_range":
        t[pos] = 1000
    elif c.value == "negative":
        t[pos] = -1
    elif c.value == "neighbour":
        t[pos] = t[pos] + 1 if t[pos] == 0 or c.position % 2 else t[pos] - 1
    else:
        index[c.tensor] = t.long()
    a = torch.randn(3, good.shape[0], device=dev)
    with pytest.raises(ValueError):
        layout = BlockSparseLayout(good.shape, good.block_size, *index)
        values = torch.randn(layout.nnz_blocks, good.block_size, good.block_size, device=dev)
        sparsevit.dds(a, BlockSparseMatrix(values, layout), backend=backend)


@examples(30)
@given(case=layout_cases(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_block_sparse_matrix_round_trips(case: LayoutCase, dtype: torch.dtype, seed: int) -> None:
    layout = case.layout()
    dense = randn(generator(seed), *layout.shape).to(dtype)
    mat = BlockSparseMatrix.from_dense(dense, layout)
    keep = layout.to_mask().repeat_interleave(case.block_size, 0).repeat_interleave(case.block_size, 1)
    assert torch.equal(mat.to_dense(), torch.where(keep, dense, torch.zeros_like(dense)))
    assert mat.t().shape == (layout.shape[1], layout.shape[0])
    assert torch.equal(mat.t().to_dense(), mat.to_dense().t())
    assert torch.equal(mat.t().t().to_dense(), mat.to_dense())


@examples(30)
@given(case=layout_cases(max_blocks=4), sparsity=st.sampled_from([0.0, 0.25, 0.5, 0.7, 0.9, 1.0]),
       norm=st.sampled_from(["l2", "l1"]), seed=st.integers(0, 2**31 - 1))
def test_from_dense_keeps_the_largest_blocks(case: LayoutCase, sparsity: float, norm: str, seed: int) -> None:
    m, k, bs = case.mb * case.block_size, case.kb * case.block_size, case.block_size
    dense = randn(generator(seed), m, k)
    mat = BlockSparseMatrix.from_dense(dense, block_size=bs, sparsity=sparsity, norm=norm)
    total = case.mb * case.kb
    assert mat.layout.nnz_blocks == kept_blocks(total, sparsity) == total - round(sparsity * total)
    blocks = dense.reshape(case.mb, bs, case.kb, bs).transpose(1, 2)
    norms = blocks.pow(2).sum((-1, -2)).sqrt() if norm == "l2" else blocks.abs().sum((-1, -2))
    kept = mat.layout.to_mask()
    if 0 < mat.layout.nnz_blocks < total:
        assert norms[kept].min() >= norms[~kept].max()
