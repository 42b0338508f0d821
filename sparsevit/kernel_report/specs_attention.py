"""Launch specs of the masked-attention kernels (``kernels/masked_attention.py``).

Arguments are derived from the kernels' own argument names, following the launcher's
conventions: ``Q, K, V, O, DO, DQ, DK, DV`` in the input dtype, per-row statistics and
accumulators in float32, ``JSTAR`` int32, ``KEEP`` float32 (or, without a mask, the
``q`` tensor as a placeholder); strides ``s{q,k,v,o,d}{b,h,n,d}`` of contiguous
``(B, H, N, D)`` tensors and ``skp{b,n}`` of a ``(B, N)`` mask.  The configs come from
the module's ``_configs`` (given whichever of the kernel's config name, product
``kind``, ``precision`` and ``block_d`` it asks for; the kind depends on the target
architecture, so the configs are per architecture), its precision rule from
``_precision``/``_upcast``.

Representative problem: DeiT-S (H = 6, N = 197) at batch 8, head dims 32, 64 and 128,
with a keep mask and eps > 0 (the DynamicViT training case, so ``HAS_EPS`` and, for
fp16/bf16, ``STORE_O32`` for the backward) and without one.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable

import triton

from .triton_specs import Launch, Ptr, SpecError, contiguous_strides, kernel_fn

__all__ = ["MODULE", "FAMILY", "DTYPES", "HEAD_DIMS", "launches"]

MODULE = "sparsevit.kernels.masked_attention"
FAMILY = "masked_attention"
DTYPES = ("fp32", "fp16", "bf16")
HEAD_DIMS = (32, 64, 128)
BATCH, HEADS, TOKENS = 8, 6, 197
DELTA_ROWS = 64  # the launcher's fixed BLOCK_M of the Δ pre-pass (on a GPU)
CAPABILITIES = (80, 90)  # the architectures whose config lists are built

# kernel -> the name its autotuned configs have in _configs(); None: launched with fixed tiles
CONFIG_NAMES = {
    "_masked_attention_fwd_kernel": "fwd",
    "_masked_attention_bwd_dkdv_kernel": "bwd_dkdv",
    "_masked_attention_bwd_dq_kernel": "bwd_dq",
    "_masked_attention_bwd_delta_kernel": None,
}
INPUT_DTYPE = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FP32 = {"O32", "MW", "LAM", "RHO", "VBAR", "DVBAR", "DELTA", "DM", "DKEEP"}
INT32 = {"JSTAR"}
FP32_OUTPUT_IN_BWD = {"_masked_attention_bwd_delta_kernel": {"O"}}  # Δ reads the float32 output when it exists


def _arg(kernel: str, name: str, dtype: str, keep: bool, head: int) -> Any:
    """The value the launcher passes for argument ``name`` of ``kernel``."""
    strides = contiguous_strides((BATCH, HEADS, TOKENS, head))
    if name in FP32_OUTPUT_IN_BWD.get(kernel, ()):
        return Ptr("fp32")  # out32 in training; the fp32 output itself for fp32 inputs
    if name in INPUT_DTYPE:
        return Ptr(dtype)
    if name in FP32:
        return Ptr("fp32")
    if name in INT32:
        return Ptr("i32")
    if name == "KEEP":
        return Ptr("fp32") if keep else Ptr(dtype)
    if m := re.fullmatch(r"skp([bn])", name):
        return (dict(b=TOKENS, n=1)[m.group(1)]) if keep else 0
    if m := re.fullmatch(r"s[qkvod]([bhnd])", name):
        return strides["bhnd".index(m.group(1))]
    if name in ("H", "N", "D"):
        return dict(H=HEADS, N=TOKENS, D=head)[name]
    if name in ("scale", "log_eps", "inv_n"):
        return dict(scale=head ** -0.5, log_eps=-13.8, inv_n=1.0 / TOKENS)[name]
    raise SpecError(f"{MODULE}.{kernel}: no rule for argument {name!r}; add one to sparsevit/kernel_report/specs_attention.py")


def _kind(dtype: str, capability: int) -> str:
    """The launcher's product kind (``_product_kind``) on a GPU of ``capability``: "fma" for
    fp32 (IEEE products), "wgmma" on sm_90, "mma" elsewhere."""
    return "fma" if dtype == "fp32" else ("wgmma" if capability // 10 == 9 else "mma")


def _configs(configs_of: Callable, name: str, dtype: str, precision: str, block_d: int) -> dict:
    """``{capability: configs}``: ``configs_of`` called with the arguments it names (``name``,
    ``kind``, ``precision``, ``block_d``) for each architecture of :data:`CAPABILITIES`."""
    return {cap: _configs_on(configs_of, dict(name=name, kind=_kind(dtype, cap), precision=precision, block_d=block_d))
            for cap in CAPABILITIES}


def _configs_on(configs_of: Callable, known: dict) -> list:
    wanted = list(inspect.signature(configs_of).parameters)
    unknown = [p for p in wanted if p not in known]
    if unknown:
        raise SpecError(f"{MODULE}._configs takes {', '.join(unknown)}; teach sparsevit/kernel_report/specs_attention.py")
    return configs_of(**{p: known[p] for p in wanted})


def launches() -> list[Launch]:
    """Every launch of the masked-attention kernels the report covers."""
    import torch

    module = importlib.import_module(MODULE)
    try:
        configs_of, precision, upcast = module._configs, module._precision, module._upcast
    except AttributeError as exc:
        raise SpecError(f"{MODULE}: {exc}; update sparsevit/kernel_report/specs_attention.py") from None
    out = []
    for kernel, config_name in CONFIG_NAMES.items():
        fn = kernel_fn(MODULE, kernel)
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        for dtype in DTYPES:
            torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
            for keep in (True, False):
                for head in HEAD_DIMS:
                    constants = dict(HAS_KEEP=keep, HAS_EPS=keep, STORE_O32=dtype != "fp32",
                                     PRECISION=precision(torch_dtype), UPCAST=upcast(torch_dtype),
                                     BLOCK_D=max(16, triton.next_power_of_2(head)))
                    if config_name is None:
                        constants["BLOCK_M"] = DELTA_ROWS
                    configs = (_configs(configs_of, config_name, dtype, constants["PRECISION"], constants["BLOCK_D"])
                               if config_name else [triton.Config({})])
                    constants = {k: v for k, v in constants.items() if k in fn.arg_names}
                    args = {name: _arg(kernel, name, dtype, keep, head) for name in runtime}
                    labels = dict(dtype=dtype, keep=int(keep), D=head)
                    tensor_cores = config_name is not None and constants.get("PRECISION") != "ieee"
                    out.append(Launch(FAMILY, MODULE, kernel, args, constants, configs, labels, tensor_cores))
    return out
