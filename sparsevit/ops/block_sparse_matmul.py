"""Block-sparse matmul: dense×sparse, sparse×dense and dense×dense→sparse, with autograd.

Block sparsity (RigL, Evci et al. ICML 2020, with the mask on ``b × b`` blocks) only
saves time when the sparse layers run on sparse kernels, in training too.  With a
block-sparse ``S`` (:class:`~sparsevit.BlockSparseMatrix`; ``B`` or ``A`` below is ``S``
or its transpose view ``Sᵀ``):

* :func:`dds` ``out = a @ B``,  a (..., P, Q), B (Q, N) -> (..., P, N);
* :func:`dsd` ``out = A @ b``,  A (M, Q), b (..., Q, N) -> (..., M, N);
* :func:`sdd` ``S = mask ⊙ Σ_batch a @ b``, a (..., M, R), b (..., R, N) -> the kept blocks.

The gradients are the other two products, so backward is block-sparse as well:

* dds: ``da = dout @ Bᵀ`` (dds), ``dB = Σ aᵀ @ dout`` (sdd on the layout of S);
* dsd: ``db = Aᵀ @ dout`` (dsd), ``dA = Σ dout @ bᵀ`` (sdd);
* sdd: ``da = dS @ bᵀ`` (dsd), ``db = aᵀ @ dS`` (dds).

Transposes (of dense operands as strided views, of sparse ones through the BSC
index) never copy.  Each product is a ``torch.library`` custom op
(``torch.ops.sparsevit.dds`` / ``dsd`` / ``sdd``) with a fake kernel and registered
autograd, on the ``cuda``, ``cpp``, ``triton`` and ``torch`` backends.  The layout enters each
op as its list of index tensors (see :meth:`BlockSparseLayout.index_tensors`).

Inside a ``torch.autocast`` region the public products cast their operands to the
region's dtype first, as autocast does for ``torch.matmul`` (:func:`autocast_operands`),
so mixed fp32/bf16 operands there are no error and the result has the autocast dtype.
Empty dims (no tokens, a zero-length contraction, zero columns) give empty or zero
results on every backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..backend import OpSupport, Support, choose_backend
from ..block_sparse import BlockSparseMatrix
from ..layout import BlockSparseLayout
from .validation import check_float, check_same_device

__all__ = ["dds", "dsd", "sdd", "autocast_operands", "BLOCK_SPARSE_SUPPORT"]

BLOCK_SPARSE_SUPPORT = OpSupport(
    op="block_sparse_matmul",
    backends={
        "cuda": Support(devices=frozenset({"cuda"})),
        "cpp": Support(devices=frozenset({"cpu"})),
        "triton": Support(),
        "torch": Support(),
    },
)

# index = [row_offsets, col_indices, row_indices, col_offsets, bsc_row_indices, bsc_perm]
_ROW_OFFSETS, _COL_INDICES, _ROW_INDICES, _COL_OFFSETS, _BSC_ROWS, _BSC_PERM = range(6)


def _shape(index: list[torch.Tensor], bs: int) -> tuple[int, int]:
    """``(M, K)`` of the stored matrix S."""
    return (index[_ROW_OFFSETS].shape[0] - 1) * bs, (index[_COL_OFFSETS].shape[0] - 1) * bs


def _row_lists(index: list[torch.Tensor], transposed: bool):
    """Row lists (offsets, indices, perm, transpose_blocks) of S, or of Sᵀ through BSC."""
    if transposed:
        return index[_COL_OFFSETS], index[_BSC_ROWS], index[_BSC_PERM], True
    return index[_ROW_OFFSETS], index[_COL_INDICES], None, False


def _batch_3d(t: torch.Tensor) -> torch.Tensor:
    """``(..., P, Q)`` as ``(T, P, Q)`` with ``T`` the product of the leading dims.

    Sizes are explicit: with a zero-size dim a -1 in ``reshape`` would be ambiguous.
    """
    return t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1])


def _rows_3d(t: torch.Tensor) -> torch.Tensor:
    """``(..., P, Q)`` as ``(T, P', Q)``: the batch folded into the rows where that is a view."""
    try:
        return t.view(1, math.prod(t.shape[:-1]), t.shape[-1])
    except RuntimeError:
        return _batch_3d(t)


_NATIVE_BACKENDS = ("cuda", "cpp")


def _native(name: str, backend: str):
    """The op ``torch.ops.sparsevit.{name}_{backend}`` of sparsevit._C (CUDA or C++ CPU kernels)."""
    return getattr(torch.ops.sparsevit, f"{name}_{backend}")


def _triton():
    from ..kernels import block_sparse_matmul

    return block_sparse_matmul


# ----------------------------------------------------------------------------------
# Backend implementations (no autograd)
# ----------------------------------------------------------------------------------
def _dds_impl(a: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], transposed: bool, backend: str) -> torch.Tensor:
    bs = values.shape[-1]
    m, k = _shape(index, bs)
    cols = m if transposed else k
    if backend == "torch":
        return reference.dds(a, values, index[_ROW_INDICES], index[_COL_INDICES], (m, k), transposed).contiguous()
    a3 = _rows_3d(a)
    lists = _row_lists(index, not transposed)  # row lists of Bᵀ
    if backend in _NATIVE_BACKENDS:
        out = _native("dds", backend)(a3, values.contiguous(), *lists, cols)
    else:
        out = _triton().dds(a3, values.contiguous(), *lists, cols)
    return out.view(*a.shape[:-1], cols)


def _dsd_impl(values: torch.Tensor, index: list[torch.Tensor], b: torch.Tensor, transposed: bool, backend: str) -> torch.Tensor:
    bs = values.shape[-1]
    m, k = _shape(index, bs)
    rows = k if transposed else m
    if backend == "torch":
        return reference.dsd(values, index[_ROW_INDICES], index[_COL_INDICES], (m, k), b, transposed).contiguous()
    b3 = _batch_3d(b)
    lists = _row_lists(index, transposed)
    if backend in _NATIVE_BACKENDS:
        out = _native("dsd", backend)(values.contiguous(), *lists, b3, rows)
    else:
        out = _triton().dsd(values.contiguous(), *lists, b3, rows)
    return out.view(*b.shape[:-2], rows, b.shape[-1])


def _sdd_impl(a: torch.Tensor, b: torch.Tensor, index: list[torch.Tensor], block_size: int, backend: str) -> torch.Tensor:
    rows, cols = index[_ROW_INDICES], index[_COL_INDICES]
    if backend == "torch":
        return reference.sdd(a, b, rows, cols, block_size).contiguous()
    a3, b3 = _batch_3d(a), _batch_3d(b)
    if backend in _NATIVE_BACKENDS:
        return _native("sdd", backend)(a3, b3, rows, cols, block_size)
    return _triton().sdd(a3, b3, index[_COL_OFFSETS], index[_BSC_ROWS], index[_BSC_PERM], block_size)


# ----------------------------------------------------------------------------------
# Custom ops: schema, fake kernel, autograd
# ----------------------------------------------------------------------------------
@torch.library.custom_op("sparsevit::dds", mutates_args=())
def _dds_op(a: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], transposed: bool, backend: str) -> torch.Tensor:
    return _dds_impl(a, values, index, transposed, backend)


@_dds_op.register_fake
def _(a: torch.Tensor, values: torch.Tensor, index: list[torch.Tensor], transposed: bool, backend: str) -> torch.Tensor:
    m, k = _shape(index, values.shape[-1])
    return a.new_empty((*a.shape[:-1], m if transposed else k))


@torch.library.custom_op("sparsevit::dsd", mutates_args=())
def _dsd_op(values: torch.Tensor, index: list[torch.Tensor], b: torch.Tensor, transposed: bool, backend: str) -> torch.Tensor:
    return _dsd_impl(values, index, b, transposed, backend)


@_dsd_op.register_fake
def _(values: torch.Tensor, index: list[torch.Tensor], b: torch.Tensor, transposed: bool, backend: str) -> torch.Tensor:
    m, k = _shape(index, values.shape[-1])
    return b.new_empty((*b.shape[:-2], k if transposed else m, b.shape[-1]))


@torch.library.custom_op("sparsevit::sdd", mutates_args=())
def _sdd_op(a: torch.Tensor, b: torch.Tensor, index: list[torch.Tensor], block_size: int, backend: str) -> torch.Tensor:
    return _sdd_impl(a, b, index, block_size, backend)


@_sdd_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, index: list[torch.Tensor], block_size: int, backend: str) -> torch.Tensor:
    return a.new_empty((index[_COL_INDICES].shape[0], block_size, block_size))


def _mT(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2)


def _dds_setup(ctx, inputs, output) -> None:
    a, values, index, transposed, backend = inputs
    ctx.save_for_backward(a, values, *index)
    ctx.transposed, ctx.backend = transposed, backend


def _dds_backward(ctx, grad: torch.Tensor):
    a, values, *index = ctx.saved_tensors
    grad_a = grad_values = None
    if ctx.needs_input_grad[0]:
        grad_a = _dds_op(grad, values, index, not ctx.transposed, ctx.backend)  # dout @ Bᵀ
    if ctx.needs_input_grad[1]:
        bs = values.shape[-1]
        if ctx.transposed:  # B = Sᵀ: dS = Σ doutᵀ @ a
            grad_values = _sdd_op(_mT(grad), a, index, bs, ctx.backend)
        else:  # B = S: dS = Σ aᵀ @ dout
            grad_values = _sdd_op(_mT(a), grad, index, bs, ctx.backend)
    return grad_a, grad_values, [None] * len(index), None, None


def _dsd_setup(ctx, inputs, output) -> None:
    values, index, b, transposed, backend = inputs
    ctx.save_for_backward(values, b, *index)
    ctx.transposed, ctx.backend = transposed, backend


def _dsd_backward(ctx, grad: torch.Tensor):
    values, b, *index = ctx.saved_tensors
    grad_values = grad_b = None
    if ctx.needs_input_grad[0]:
        bs = values.shape[-1]
        if ctx.transposed:  # A = Sᵀ: dS = Σ b @ doutᵀ
            grad_values = _sdd_op(b, _mT(grad), index, bs, ctx.backend)
        else:  # A = S: dS = Σ dout @ bᵀ
            grad_values = _sdd_op(grad, _mT(b), index, bs, ctx.backend)
    if ctx.needs_input_grad[2]:
        grad_b = _dsd_op(values, index, grad, not ctx.transposed, ctx.backend)  # Aᵀ @ dout
    return grad_values, [None] * len(index), grad_b, None, None


def _sdd_setup(ctx, inputs, output) -> None:
    a, b, index, block_size, backend = inputs
    ctx.save_for_backward(a, b, *index)
    ctx.backend = backend


def _sdd_backward(ctx, grad: torch.Tensor):
    a, b, *index = ctx.saved_tensors
    grad_a = grad_b = None
    grad = grad.contiguous()
    if ctx.needs_input_grad[0]:
        grad_a = _dsd_op(grad, index, _mT(b), False, ctx.backend)  # dS @ bᵀ
    if ctx.needs_input_grad[1]:
        grad_b = _dds_op(_mT(a), grad, index, False, ctx.backend)  # aᵀ @ dS
    return grad_a, grad_b, [None] * len(index), None, None


_dds_op.register_autograd(_dds_backward, setup_context=_dds_setup)
_dsd_op.register_autograd(_dsd_backward, setup_context=_dsd_setup)
_sdd_op.register_autograd(_sdd_backward, setup_context=_sdd_setup)


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------
def autocast_operands(device: torch.device, *tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """The operands of a product as ``torch.autocast`` would give them to ``torch.matmul``.

    Inside an autocast region for ``device``'s type, every floating tensor is cast to
    the region's dtype (``torch.get_autocast_dtype``), as autocast does for
    ``matmul``/``linear`` (on its lower-precision list); otherwise, and for ``None``
    entries, the tensors are returned unchanged.  The casts are differentiable, so
    fp32 leaves get fp32 gradients.  Modules add their bias after the product, so a
    bias goes through here too to keep the output in the autocast dtype, as
    ``nn.Linear`` does.
    """
    kind = device.type
    if not (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _check_dense(name: str, t: object, dims: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims {dims}, got shape {tuple(t.shape)}")
    check_float(name, t)
    return t


def _check_sparse(name: str, s: object) -> BlockSparseMatrix:
    if not isinstance(s, BlockSparseMatrix):
        raise TypeError(f"{name} must be a BlockSparseMatrix, got {type(s).__name__}")
    check_float(f"{name}.values", s.values)
    return s


def _check_pair(dense_name: str, dense: torch.Tensor, sparse_name: str, sparse: BlockSparseMatrix) -> None:
    check_same_device([(dense_name, dense), (f"{sparse_name}.values", sparse.values)])
    if sparse.layout.device != dense.device:
        raise ValueError(f"{sparse_name}.layout must be on the same device as {dense_name} ({dense.device}), got {sparse.layout.device}")
    if sparse.dtype != dense.dtype:
        raise TypeError(f"{sparse_name} and {dense_name} must have the same dtype, got {sparse.dtype} and {dense.dtype}")


def dds(a: torch.Tensor, b: BlockSparseMatrix, *, backend: Optional[str] = None) -> torch.Tensor:
    """Dense × block-sparse: ``out = a @ b``.

    Args:
        a: (..., P, Q) float32/float16/bfloat16, any strides (e.g. tokens ``x``).
        b: (Q, N) :class:`BlockSparseMatrix` of the same dtype and device (``W.t()`` for a
            Linear with sparse ``W (N, Q)``: ``x @ Wᵀ`` without a copy).
        backend: ``"cuda"``, ``"cpp"``, ``"triton"``, ``"torch"`` or None (``SPARSEVIT_BACKEND``, else
            the fastest available).

    Returns:
        (..., P, N) contiguous, dtype of ``a``.  Gradients: ``da = dout @ bᵀ`` (dds),
        ``db = Σ_batch aᵀ @ dout`` on b's blocks only (sdd).
    """
    a = _check_dense("a", a, "(..., P, Q)")
    b = _check_sparse("b", b)
    a, values = autocast_operands(a.device, a, b.values)
    b = BlockSparseMatrix(values, b.layout, b.transposed) if values is not b.values else b
    _check_pair("a", a, "b", b)
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"a (..., P, Q) and b (Q, N) must agree on Q: a.shape[-1]={a.shape[-1]}, b.shape={b.shape}")
    name = choose_backend(BLOCK_SPARSE_SUPPORT, [a, b.values], backend)
    return _dds_op(a, b.values, b.layout.index_tensors(), b.transposed, name)


def dsd(a: BlockSparseMatrix, b: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Block-sparse × dense: ``out = a @ b``.

    Args:
        a: (M, Q) :class:`BlockSparseMatrix` (or a ``.t()`` view).
        b: (..., Q, N) float32/float16/bfloat16 of a's dtype and device, any strides.
        backend: as in :func:`dds`.

    Returns:
        (..., M, N) contiguous.  Gradients: ``db = aᵀ @ dout`` (dsd), ``da = Σ_batch dout @ bᵀ``
        on a's blocks only (sdd).
    """
    a = _check_sparse("a", a)
    b = _check_dense("b", b, "(..., Q, N)")
    b, values = autocast_operands(b.device, b, a.values)
    a = BlockSparseMatrix(values, a.layout, a.transposed) if values is not a.values else a
    _check_pair("b", b, "a", a)
    if b.shape[-2] != a.shape[1]:
        raise ValueError(f"a (M, Q) and b (..., Q, N) must agree on Q: a.shape={a.shape}, b.shape[-2]={b.shape[-2]}")
    name = choose_backend(BLOCK_SPARSE_SUPPORT, [b, a.values], backend)
    return _dsd_op(a.values, a.layout.index_tensors(), b, a.transposed, name)


def sdd(a: torch.Tensor, b: torch.Tensor, layout: BlockSparseLayout, *, backend: Optional[str] = None) -> BlockSparseMatrix:
    """Dense × dense -> block-sparse: only the kept blocks of ``Σ_batch a @ b``.

    ``values[t] = Σ_batch (a @ b)[i·s:(i+1)·s, j·s:(j+1)·s]`` for the ``t``-th kept block
    ``(i, j)`` of ``layout`` (block size s); the other blocks are never computed.  Leading
    batch dims (the same on both) are summed over, as in a weight gradient
    ``dW = Σ_tokens doutᵀ x``.

    Args:
        a: (..., M, R) float32/float16/bfloat16, any strides (e.g. ``dout.mT``).
        b: (..., R, N) of a's dtype, device and batch shape.
        layout: the (M, N) :class:`BlockSparseLayout` of the result, on a's device.
        backend: as in :func:`dds`.

    Returns:
        :class:`BlockSparseMatrix` with values (nnz, s, s).  Gradients: ``da = dS @ bᵀ``
        (dsd), ``db = aᵀ @ dS`` (dds).
    """
    a = _check_dense("a", a, "(..., M, R)")
    b = _check_dense("b", b, "(..., R, N)")
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    check_same_device([("a", a), ("b", b)])
    a, b = autocast_operands(a.device, a, b)
    if layout.device != a.device:
        raise ValueError(f"layout must be on the same device as a ({a.device}), got {layout.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a (..., M, R) and b (..., R, N) must agree on R: a.shape={tuple(a.shape)}, b.shape={tuple(b.shape)}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"a and b must have the same batch dims, got {tuple(a.shape[:-2])} and {tuple(b.shape[:-2])}")
    if (a.shape[-2], b.shape[-1]) != layout.shape:
        raise ValueError(f"a @ b is {(a.shape[-2], b.shape[-1])} but layout is {layout.shape}")
    name = choose_backend(BLOCK_SPARSE_SUPPORT, [a, b], backend)
    values = _sdd_op(a, b, layout.index_tensors(), layout.block_size, name)
    return BlockSparseMatrix(values, layout)
