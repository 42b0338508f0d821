"""Launch specs of the block-sparse matmul kernels (``kernels/block_sparse_matmul.py``).

Everything the report knows about these kernels is in this file: when the kernels
change, update it only.  It leans on the module's own pieces so that most changes
need no update at all: the autotune configs (``_dds_configs(bs, dtype class)``,
``_sdd_configs``), and the launchers' argument builders (``_dds_launch_args``,
``_sdd_launch_args``: positional runtime arguments and constexprs from tensors), which
are called here on ``meta`` tensors of the representative problem, after the same
batch folding (``_fold_rows``, ``_fold_contraction``) the launchers apply.

Representative problem: a ViT-S/16 MLP ``fc1`` at 224² (197 tokens, 384 → 1536
features) at batch 8 with half of the blocks kept, in the ways the ops call the kernels:

* ``dds_fwd``: ``y = x @ Wᵀ`` (``BlockSparseLinear``): blocks as stored, no permutation;
* ``dds_bwd``: ``dx = dy @ W``: transposed blocks through the BSC permutation;
* ``dsd``: ``S @ b`` for a contiguous ``b (8, 384, 1024)`` (tokens on M as ``bᵀ`` views);
* ``sdd``: ``dW = Σ_t dy[t]ᵀ @ x[t]`` without split-K (``split=0``), and with it
  (``split=1``, which changes only the epilogue) at block size 64; the split
  reduction ``_sum_splits_kernel`` with 4 splits.
"""

from __future__ import annotations

import importlib
from typing import Any

import triton

from .triton_specs import Launch, Ptr, SpecError, kernel_fn

__all__ = ["MODULE", "FAMILY", "BLOCK_SIZES", "DTYPES", "DDS_MODES", "launches"]

MODULE = "sparsevit.kernels.block_sparse_matmul"
FAMILY = "block_sparse_matmul"
SPEC = "sparsevit/kernel_report/specs_block_sparse.py"
BLOCK_SIZES = (16, 32, 64, 128)
DTYPES = ("fp32", "fp16", "bf16")
DDS_MODES = ("dds_fwd", "dds_bwd", "dsd")
SPLIT_BLOCK_SIZES = (64,)  # block sizes whose sdd is also compiled with split-K

BATCH, TOKENS, IN, OUT = 8, 197, 384, 1536
DSD_N = 1024
DENSITY = 0.5
SPLITS = 4
_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}


def _attr(module: Any, name: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        raise SpecError(f"{MODULE} has no {name}; update {SPEC}") from None


def _meta(shape: tuple, dtype) -> Any:
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _named(kernel: str, positional: tuple) -> dict:
    """The launcher's positional runtime arguments by the kernel's parameter names, tensors as :class:`Ptr`."""
    import torch

    names = [p.name for p in kernel_fn(MODULE, kernel).params if not p.is_constexpr]
    if len(names) != len(positional):
        raise SpecError(f"{MODULE}.{kernel} takes {len(names)} runtime arguments but its launch-args builder gives "
                        f"{len(positional)}; update {SPEC}")
    return {n: Ptr(_TRITON_TYPES[str(v.dtype).replace("torch.", "")]) if isinstance(v, torch.Tensor) else v
            for n, v in zip(names, positional)}


def _dds(module: Any, mode: str, dtype, bs: int) -> tuple[dict, dict]:
    """``_dds_kernel``'s arguments and constexprs for ``mode`` (see the module docstring)."""
    import torch

    i32 = torch.int32
    if mode == "dsd":  # dsd: outᵀ (T, N, rows) = bᵀ (T, N, Q) @ Aᵀ
        q, cols = IN, OUT
        b, out = _meta((BATCH, q, DSD_N), dtype), _meta((BATCH, cols, DSD_N), dtype)
        a, out = b.transpose(1, 2), out.transpose(1, 2)
    else:
        q, cols = (IN, OUT) if mode == "dds_fwd" else (OUT, IN)
        a, out = _meta((BATCH, TOKENS, q), dtype), _meta((BATCH, TOKENS, cols), dtype)
    nnz = int(DENSITY * (q // bs) * (cols // bs))
    values, offsets, indices = _meta((nnz, bs, bs), dtype), _meta((cols // bs + 1,), i32), _meta((nnz,), i32)
    perm = _meta((nnz,), i32) if mode == "dds_bwd" else None
    a, out = _attr(module, "_fold_rows")(a, out)
    args, consts = _attr(module, "_dds_launch_args")(values, offsets, indices, perm, mode == "dds_bwd", a, out)
    return _named("_dds_kernel", args), consts


def _sdd(module: Any, dtype, bs: int, split: bool) -> tuple[dict, dict]:
    """``_sdd_kernel``'s arguments and constexprs for ``dW = Σ_t dy[t]ᵀ @ x[t]``."""
    import torch

    i32 = torch.int32
    dy, x = _meta((BATCH, TOKENS, OUT), dtype), _meta((BATCH, TOKENS, IN), dtype)
    a, b = _attr(module, "_fold_contraction")(dy.transpose(1, 2), x)
    nnz = int(DENSITY * (OUT // bs) * (IN // bs))
    col_offsets, rows, perm = _meta((IN // bs + 1,), i32), _meta((nnz,), i32), _meta((nnz,), i32)
    out = _meta((SPLITS, nnz, bs, bs), torch.float32) if split else _meta((nnz, bs, bs), dtype)
    args, consts = _attr(module, "_sdd_launch_args")(a, b, col_offsets, rows, perm, bs, out, split)
    return _named("_sdd_kernel", args), consts


def launches() -> list[Launch]:
    """Every launch of the block-sparse kernels the report covers."""
    import torch

    module = importlib.import_module(MODULE)
    dds_configs, sdd_configs = _attr(module, "_dds_configs"), _attr(module, "_sdd_configs")
    dtype_class = _attr(module, "_dtype_class")
    out = []
    for name in DTYPES:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
        for bs in BLOCK_SIZES:
            for mode in DDS_MODES:
                args, consts = _dds(module, mode, dtype, bs)
                out.append(Launch(FAMILY, MODULE, "_dds_kernel", args, consts, dds_configs(bs, dtype_class(dtype)),
                                  dict(dtype=name, bs=bs, mode=mode), consts.get("PRECISION") != "ieee"))
            for split in (False, True) if bs in SPLIT_BLOCK_SIZES else (False,):
                args, consts = _sdd(module, dtype, bs, split)
                out.append(Launch(FAMILY, MODULE, "_sdd_kernel", args, consts, sdd_configs(bs, dtype_class(dtype)),
                                  dict(dtype=name, bs=bs, mode="sdd", split=int(split)),
                                  consts.get("PRECISION") != "ieee"))
        n = int(DENSITY * (OUT // 64) * (IN // 64)) * 64 * 64
        sum_args = _named("_sum_splits_kernel", (_meta((SPLITS, n), torch.float32), _meta((n,), dtype), n, SPLITS))
        out.append(Launch(FAMILY, MODULE, "_sum_splits_kernel", sum_args, dict(BLOCK=_attr(module, "_SUM_BLOCK")),
                          [triton.Config({})], dict(dtype=name, mode="sdd_sum"), False))
    return out
