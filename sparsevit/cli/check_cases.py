"""The inputs of ``python -m sparsevit check``: a few small cases of every op.

Each :class:`Case` builds fresh random inputs (never zeros: they hide unwritten
outputs) at an odd shape, some of them batch 1 or non-contiguous views, and says how
to call the op on a backend and the reference (:mod:`sparsevit.reference`, the
specification) on the same values.  Float inputs are the leaves whose gradients are
compared; integer indices, layouts and counts are fixed per case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import ops, reference
from ..block_sparse import BlockSparseMatrix
from ..layout import BlockSparseLayout

__all__ = ["CASES", "Case", "Inputs", "OPS"]

OPS = ("gather_tokens", "scatter_tokens", "scatter_add_tokens", "select_tokens", "dds", "dsd", "sdd",
       "masked_softmax", "masked_attention")


@dataclass
class Inputs:
    """One case's tensors: ``leaves`` (float, get gradients) and ``fixed`` (anything else)."""

    leaves: dict
    fixed: dict


@dataclass(frozen=True)
class Case:
    """One op at one shape.

    ``ours(leaves, fixed, backend)`` calls the public op; ``ref(leaves, fixed)`` the
    reference (given float64 copies of the leaves); ``support_tensors`` the tensors
    whose device and dtype decide which backends can run; ``extra(out, fixed)``
    returns a reason when a non-float output (an index) differs from what it must be.
    """

    op: str
    label: str
    make: Callable[[torch.device, torch.dtype, torch.Generator], Inputs]
    ours: Callable[[dict, dict, str], torch.Tensor]
    ref: Callable[[dict, dict], torch.Tensor]
    support_tensors: Callable[[dict, dict], list]
    extra: "Callable[[dict, dict, str], str | None] | None" = None


def _randn(gen: torch.Generator, *shape: int, device: torch.device, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """Standard normal values; ``transposed`` stores the last two dims swapped (a non-contiguous view)."""
    if transposed:
        *lead, a, b = shape
        return torch.randn(*lead, b, a, generator=gen).to(device, dtype).transpose(-1, -2)
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _randint(gen: torch.Generator, high: int, shape: tuple, device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen).to(device)


def _distinct(gen: torch.Generator, b: int, n: int, k: int, device: torch.device) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b)]).to(device)


def _keep(gen: torch.Generator, b: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Soft keep values in [0, 1] with some keys dropped exactly (0) and some kept (1)."""
    keep = torch.rand(b, n, generator=gen)
    keep[:, ::3] = 0.0
    keep[:, 1::5] = 1.0
    return keep.to(device, dtype)


def _layout(gen: torch.Generator, shape: tuple, device: torch.device, block: int = 16) -> BlockSparseLayout:
    """About half the blocks, the first block row always empty (an edge the kernels must skip)."""
    mb, kb = shape[0] // block, shape[1] // block
    mask = torch.rand(mb, kb, generator=gen) < 0.5
    mask[0] = False
    mask[-1, -1] = True
    return BlockSparseLayout.from_mask(mask.to(device), block)


# -- token ops ------------------------------------------------------------------------
def _gather(b: int, n: int, c: int, k: int, transposed: bool) -> Case:
    def make(device, dtype, gen):
        x = _randn(gen, b, n, c, device=device, dtype=dtype, transposed=transposed)
        return Inputs({"x": x}, {"index": _randint(gen, n, (b, k), device)})

    return Case("gather_tokens", f"x {b}x{n}x{c}, K={k}" + (" (non-contiguous)" if transposed else ""), make,
                lambda lv, fx, be: ops.gather_tokens(lv["x"], fx["index"], backend=be),
                lambda lv, fx: reference.gather_tokens(lv["x"], fx["index"]),
                lambda lv, fx: [lv["x"], fx["index"]])


def _scatter(b: int, n: int, c: int, k: int, with_base: bool) -> Case:
    def make(device, dtype, gen):
        leaves = {"src": _randn(gen, b, k, c, device=device, dtype=dtype)}
        if with_base:
            leaves["base"] = _randn(gen, b, n, c, device=device, dtype=dtype)
        return Inputs(leaves, {"index": _distinct(gen, b, n, k, device), "n": n})

    def ours(lv, fx, be):
        if "base" in lv:
            return ops.scatter_tokens(lv["src"], fx["index"], base=lv["base"], backend=be)
        return ops.scatter_tokens(lv["src"], fx["index"], fx["n"], fill=0.5, backend=be)

    def ref(lv, fx):
        base = lv.get("base")
        if base is None:
            src = lv["src"]
            base = src.new_full((src.shape[0], fx["n"], src.shape[2]), 0.5)
        return reference.scatter_tokens(lv["src"], fx["index"], base)

    return Case("scatter_tokens", f"src {b}x{k}x{c} into N={n}" + (" with base" if with_base else ", fill 0.5"),
                make, ours, ref, lambda lv, fx: [lv["src"], fx["index"]])


def _scatter_add(b: int, n: int, c: int, k: int) -> Case:
    def make(device, dtype, gen):
        return Inputs({"src": _randn(gen, b, k, c, device=device, dtype=dtype)},
                      {"index": _randint(gen, n, (b, k), device), "n": n})

    return Case("scatter_add_tokens", f"src {b}x{k}x{c} into n={n} (repeated indices)", make,
                lambda lv, fx, be: ops.scatter_add_tokens(lv["src"], fx["index"], fx["n"], backend=be),
                lambda lv, fx: reference.scatter_add_tokens(lv["src"], fx["index"], fx["n"]),
                lambda lv, fx: [lv["src"], fx["index"]])


def _select(b: int, n: int, c: int, keep: int, num_prefix: int, order: str) -> Case:
    def make(device, dtype, gen):
        x = _randn(gen, b, n, c, device=device, dtype=dtype)
        return Inputs({"x": x}, {"scores": torch.randn(b, n - num_prefix, generator=gen).to(device)})

    def ours(lv, fx, be):
        tokens, index = ops.select_tokens(lv["x"], fx["scores"], keep, num_prefix=num_prefix, order=order, backend=be)
        fx["got_index"] = index
        return tokens

    def ref(lv, fx):
        return reference.select_tokens(lv["x"], fx["scores"], keep, num_prefix, order)[0]

    def extra(lv, fx, be):
        want = reference.select_index(fx["scores"], keep, num_prefix, order)
        if not torch.equal(fx["got_index"].cpu(), want.cpu()):
            return "the kept indices differ from the reference's"
        return None

    return Case("select_tokens", f"x {b}x{n}x{c}, keep {keep}, prefix {num_prefix}, {order} order", make, ours, ref,
                lambda lv, fx: [lv["x"], fx["scores"]], extra)


# -- block-sparse products --------------------------------------------------------------
def _dds(lead: tuple, p: int, sparse_shape: tuple, transposed: bool) -> Case:
    q = sparse_shape[1] if transposed else sparse_shape[0]

    def make(device, dtype, gen):
        layout = _layout(gen, sparse_shape, device)
        a = _randn(gen, *lead, p, q, device=device, dtype=dtype, transposed=not transposed)
        values = _randn(gen, layout.nnz_blocks, 16, 16, device=device, dtype=dtype)
        return Inputs({"a": a, "values": values}, {"layout": layout})

    def ours(lv, fx, be):
        s = BlockSparseMatrix(lv["values"], fx["layout"])
        return ops.dds(lv["a"], s.t() if transposed else s, backend=be)

    def ref(lv, fx):
        lay = fx["layout"]
        return reference.dds(lv["a"], lv["values"], lay.row_indices, lay.col_indices, lay.shape, transposed)

    s = f"S{'ᵀ' if transposed else ''} with S {sparse_shape[0]}x{sparse_shape[1]}"
    return Case("dds", f"a {'x'.join(map(str, (*lead, p, q)))} @ {s}, block 16", make, ours, ref,
                lambda lv, fx: [lv["a"], lv["values"]])


def _dsd(sparse_shape: tuple, lead: tuple, n: int, transposed: bool) -> Case:
    q = sparse_shape[0] if transposed else sparse_shape[1]

    def make(device, dtype, gen):
        layout = _layout(gen, sparse_shape, device)
        values = _randn(gen, layout.nnz_blocks, 16, 16, device=device, dtype=dtype)
        b = _randn(gen, *lead, q, n, device=device, dtype=dtype, transposed=transposed)
        return Inputs({"values": values, "b": b}, {"layout": layout})

    def ours(lv, fx, be):
        s = BlockSparseMatrix(lv["values"], fx["layout"])
        return ops.dsd(s.t() if transposed else s, lv["b"], backend=be)

    def ref(lv, fx):
        lay = fx["layout"]
        return reference.dsd(lv["values"], lay.row_indices, lay.col_indices, lay.shape, lv["b"], transposed)

    s = f"S{'ᵀ' if transposed else ''} with S {sparse_shape[0]}x{sparse_shape[1]}"
    return Case("dsd", f"{s} @ b {'x'.join(map(str, (*lead, q, n)))}, block 16", make, ours, ref,
                lambda lv, fx: [lv["b"], lv["values"]])


def _sdd(lead: tuple, m: int, r: int, n: int) -> Case:
    def make(device, dtype, gen):
        layout = _layout(gen, (m, n), device)
        a = _randn(gen, *lead, m, r, device=device, dtype=dtype)
        b = _randn(gen, *lead, r, n, device=device, dtype=dtype, transposed=True)
        return Inputs({"a": a, "b": b}, {"layout": layout})

    def ref(lv, fx):
        lay = fx["layout"]
        return reference.sdd(lv["a"], lv["b"], lay.row_indices, lay.col_indices, lay.block_size)

    return Case("sdd", f"blocks of a {'x'.join(map(str, (*lead, m, r)))} @ b {'x'.join(map(str, (*lead, r, n)))}",
                make, lambda lv, fx, be: ops.sdd(lv["a"], lv["b"], fx["layout"], backend=be).values, ref,
                lambda lv, fx: [lv["a"], lv["b"]])


# -- masked softmax and attention -----------------------------------------------------------
def _softmax(b: int, h: int, n: int, masked: bool) -> Case:
    def make(device, dtype, gen):
        leaves = {"scores": _randn(gen, b, h, n, n, device=device, dtype=dtype) * 2}
        if masked:
            leaves["keep"] = _keep(gen, b, n, device, dtype)
        return Inputs(leaves, {})

    return Case("masked_softmax", f"scores {b}x{h}x{n}x{n}, " + ("soft keep" if masked else "no keep"), make,
                lambda lv, fx, be: ops.masked_softmax(lv["scores"], lv.get("keep"), 1e-6, backend=be),
                lambda lv, fx: reference.masked_softmax(lv["scores"], lv.get("keep"), 1e-6),
                lambda lv, fx: [lv["scores"]])


def _attention(b: int, h: int, n: int, d: int, masked: bool, transposed: bool) -> Case:
    def make(device, dtype, gen):
        leaves = {name: _randn(gen, b, h, n, d, device=device, dtype=dtype, transposed=transposed) for name in "qkv"}
        if masked:
            leaves["keep"] = _keep(gen, b, n, device, dtype)
        return Inputs(leaves, {})

    label = f"q,k,v {b}x{h}x{n}x{d}, " + ("soft keep" if masked else "no keep") + (" (non-contiguous)" if transposed else "")
    return Case("masked_attention", label, make,
                lambda lv, fx, be: ops.masked_attention(lv["q"], lv["k"], lv["v"], lv.get("keep"), eps=1e-6, backend=be),
                lambda lv, fx: reference.masked_attention(lv["q"], lv["k"], lv["v"], lv.get("keep"), None, 1e-6),
                lambda lv, fx: [lv["q"], lv["k"], lv["v"]])


CASES: tuple = (
    _gather(2, 13, 24, 9, False), _gather(1, 7, 40, 16, True),
    _scatter(2, 13, 24, 6, True), _scatter(1, 9, 17, 9, False),
    _scatter_add(2, 11, 24, 15), _scatter_add(1, 5, 33, 3),
    _select(2, 17, 24, 8, 1, "position"), _select(1, 10, 40, 3, 2, "score"),
    _dds((2,), 24, (48, 32), True), _dds((), 40, (48, 32), False),
    _dsd((48, 32), (), 20, False), _dsd((48, 32), (2,), 12, True),
    _sdd((2,), 48, 20, 32), _sdd((), 48, 9, 64),
    _softmax(2, 2, 13, True), _softmax(1, 3, 20, False),
    _attention(2, 2, 13, 16, True, False), _attention(1, 3, 20, 24, False, True),
)
