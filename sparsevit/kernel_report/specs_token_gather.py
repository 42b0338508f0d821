"""Launch specs of the token gather/scatter kernels (``kernels/token_gather.py``).

These kernels are not autotuned: the launcher picks ``(ROWS, BLOCK_C)`` with the
module's ``_launch_config(K, C)``, so the "configs" here are the distinct choices it
makes for the benchmark suite's channel counts, with Triton's default
``num_warps``/``num_stages``.  Representative problem: B = 256 images of N = 197
tokens, K = 138 kept (70%), C = 384, 768, 1024, contiguous tensors and int64 indices
(as ``sparsevit.ops`` passes them).  Scatter-add accumulates into float32.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import triton

from .triton_specs import Launch, Ptr, SpecError, contiguous_strides, kernel_fn

__all__ = ["MODULE", "FAMILY", "DTYPES", "CHANNELS", "launches"]

MODULE = "sparsevit.kernels.token_gather"
FAMILY = "token_gather"
DTYPES = ("fp32", "fp16", "bf16")
CHANNELS = (384, 768, 1024)
BATCH, TOKENS, KEPT = 256, 197, 138

# kernel -> (label, extra launcher constexprs) per way the launcher calls it
CALLS = {
    "_gather_tokens_kernel": [("gather", {})],
    "_scatter_tokens_kernel": [("scatter", {"ACCUMULATE": False}), ("scatter_add", {"ACCUMULATE": True})],
    "_segment_sum_kernel": [("scatter_add_det", {})],
}


def _tensors(kernel: str, op: str, channels: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors behind each stride prefix (x, src: the rows read; out: the rows written)."""
    per_k = (BATCH, KEPT, channels)
    per_n = (BATCH, TOKENS, channels)
    if op == "gather":
        return dict(x=per_n, i=(BATCH, KEPT), o=per_k)
    return dict(s=per_k, i=(BATCH, KEPT), o=per_n)


def _arg(kernel: str, op: str, name: str, dtype: str, channels: int) -> Any:
    """The value the launcher passes for argument ``name``."""
    pointers = dict(x_ptr=Ptr(dtype), src_ptr=Ptr(dtype), idx_ptr=Ptr("i64"), order_ptr=Ptr("i64"),
                    offsets_ptr=Ptr("i64"), out_ptr=Ptr("fp32" if op in ("scatter_add", "scatter_add_det") else dtype))
    if name in pointers:
        return pointers[name]
    if name in ("K", "N", "C", "row0"):
        return dict(K=KEPT, N=TOKENS, C=channels, row0=0)[name]
    if m := re.fullmatch(r"s([xiso])([bnkc])", name):
        shape = _tensors(kernel, op, channels)[m.group(1)]
        dims = "bk" if m.group(1) == "i" else ("b" + ("k" if shape[1] == KEPT else "n") + "c")
        if m.group(2) not in dims:
            raise SpecError(f"{MODULE}.{kernel}: stride {name} does not match its tensor's dims {dims}")
        return contiguous_strides(shape)[dims.index(m.group(2))]
    raise SpecError(f"{MODULE}.{kernel}: no rule for argument {name!r}; add one to sparsevit/kernel_report/specs_token_gather.py")


def launches() -> list[Launch]:
    """Every launch of the token kernels the report covers."""
    module = importlib.import_module(MODULE)
    try:
        launch_config = module._launch_config
    except AttributeError:
        raise SpecError(f"{MODULE} has no _launch_config; update sparsevit/kernel_report/specs_token_gather.py") from None
    # each distinct (ROWS, BLOCK_C) choice, with the smallest channel count that gets it
    tiles = {launch_config(KEPT, c): c for c in sorted(CHANNELS, reverse=True)}
    out = []
    for kernel, calls in CALLS.items():
        fn = kernel_fn(MODULE, kernel)
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        seen = set()
        for (rows, block_c), channels in sorted(tiles.items(), key=lambda t: t[1]):
            tile = {k: v for k, v in dict(ROWS=rows, BLOCK_C=block_c).items() if k in fn.arg_names}
            if tuple(tile.items()) in seen:
                continue
            seen.add(tuple(tile.items()))
            for op, extra in calls:
                for dtype in DTYPES:
                    args = {name: _arg(kernel, op, name, dtype, channels) for name in runtime}
                    out.append(Launch(FAMILY, MODULE, kernel, args, dict(extra), [triton.Config(tile)],
                                      dict(dtype=dtype, op=op, C=channels), False))
    return out
