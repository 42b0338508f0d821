"""The Triton masked-attention kernels compile for Hopper (sm_90) even on a machine without a GPU.

The interpreter runs the kernels' Python; this compiles their GPU path (no UPCAST,
real tl.dot, TF32/IEEE products) down to a cubin, so a GPU-only compile error
cannot hide until the kernels first meet a GPU.  It runs in a subprocess because
the test session has Triton in interpreter mode.

A second test compiles every autotune config of a few representative variants as the
launcher specialises them for contiguous inputs (16-byte aligned pointers, strides
that are multiples of 16) and reads ptxas's report: no config may spill registers,
and float16/bfloat16 tiles must use wgmma (no mma.sync) on sm_90a.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The kernels module and its pointer arguments (fp32 ones: the statistics and the mask).
HEADER = r'''
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

kernels = importlib.import_module("sparsevit.kernels.masked_attention")
POINTERS = {"Q", "K", "V", "KEEP", "O", "O32", "MW", "LAM", "RHO", "JSTAR", "DO", "VBAR", "DVBAR", "DELTA", "DM",
            "DK", "DV", "DKEEP", "DQ"}
FP32_POINTERS = {"O32", "MW", "LAM", "RHO", "VBAR", "DVBAR", "DELTA", "DM", "DKEEP", "KEEP"}
'''

SCRIPT = HEADER + r'''
def compile_one(kernel, dtype, has_keep, head):
    fn = getattr(kernels, kernel)
    block = 32 if dtype == "fp32" else 64
    consts = dict(HAS_KEEP=has_keep, HAS_EPS=has_keep, STORE_O32=dtype != "fp32",
                  PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False,
                  BLOCK_M=block, BLOCK_N=block, BLOCK_D=head)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "JSTAR":
            sig[name] = "*i32"
        elif name in POINTERS:
            sig[name] = "*" + ("fp32" if name in FP32_POINTERS else dtype)
        elif name in ("scale", "log_eps", "inv_n"):
            sig[name] = "fp32"
        elif name in ("H", "N", "D"):
            sig[name] = "i32"
        else:
            sig[name] = "i64"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    assert compiled.asm.get("cubin"), "no cubin produced"
    assert compiled.metadata.shared <= 228 * 1024, compiled.metadata.shared
    print("compiled", kernel, dtype, has_keep, head, compiled.metadata.shared)


dtype = sys.argv[1]
has_keep = sys.argv[2] == "1"
head = int(sys.argv[3])
for kernel in ("_masked_attention_fwd_kernel", "_masked_attention_bwd_delta_kernel",
               "_masked_attention_bwd_dkdv_kernel", "_masked_attention_bwd_dq_kernel"):
    compile_one(kernel, dtype, has_keep, head)
'''


@pytest.mark.parametrize("dtype, has_keep, head", [("bf16", True, 64), ("fp32", False, 32), ("fp16", False, 128)])
def test_compiles_for_sm90(dtype: str, has_keep: bool, head: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", SCRIPT, dtype, "1" if has_keep else "0", str(head)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("compiled") == 4, done.stdout


SPILL_SCRIPT = HEADER + r'''
import os, subprocess, tempfile
from sparsevit.kernel_report.ptxas_log import parse_ptxas_log
from sparsevit.kernel_report.tools import find_tool
NAMES = {"_masked_attention_fwd_kernel": "fwd", "_masked_attention_bwd_dkdv_kernel": "bwd_dkdv",
         "_masked_attention_bwd_dq_kernel": "bwd_dq"}


def spills(ptx, arch):
    """Spill-store bytes from ptxas -v, run with the options Triton gives it where ptxas takes them."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        base = [find_tool("ptxas"), "-v", "-lineinfo", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")]
        done = subprocess.run(base[:1] + ["--regAllocOptLevel=2"] + base[1:], capture_output=True, text=True)
        if done.returncode != 0:
            done = subprocess.run(base, check=True, capture_output=True, text=True)
    found = parse_ptxas_log(done.stderr)
    assert found, "ptxas -v reported no entry function:\n" + done.stderr
    return sum(r.spill_stores for r in found.values())


def compile_all(kernel, dtype, has_keep, head, arch):
    fn = getattr(kernels, kernel)
    precision = "ieee" if dtype == "fp32" else "tf32"
    kind = "fma" if dtype == "fp32" else "wgmma" if arch == 90 else "mma"
    for config in kernels._configs(NAMES[kernel], kind, head):
        consts = dict(HAS_KEEP=has_keep, HAS_EPS=has_keep, STORE_O32=dtype != "fp32", PRECISION=precision,
                      UPCAST=False, BLOCK_D=head, **config.kwargs)
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name == "JSTAR":
                sig[name] = "*i32"
            elif name in POINTERS:
                sig[name] = "*" + ("fp32" if name in FP32_POINTERS else dtype)
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif name in ("scale", "log_eps", "inv_n"):
                sig[name] = "fp32"
            else:
                # H, N and the strides of contiguous (B, H, N, D) tensors and a (B, N) mask: the
                # row strides are multiples of the head dim; N, H and keep's strides need not be
                sig[name] = "i32"
                if name.startswith("s") and not name.startswith("skp") or name == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        ptx = compiled.asm["ptx"]
        what = (kernel, dtype, has_keep, head, arch, str(config))
        assert spills(ptx, arch) == 0, f"spills: {what}"
        assert compiled.metadata.shared <= (227 if arch == 90 else 163) * 1024, f"shared memory: {what}"
        if arch == 90 and dtype != "fp32":
            assert "wgmma" in ptx and "mma.sync" not in ptx, f"not wgmma: {what}"
        print("clean", *what)


dtype, has_keep, head, arch = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
for kernel in NAMES:
    compile_all(kernel, dtype, has_keep, head, arch)
'''


@pytest.mark.parametrize("dtype, has_keep, head, arch", [("bf16", True, 64, 90), ("fp16", True, 128, 80),
                                                         ("fp32", True, 128, 90)])
def test_autotune_configs_do_not_spill(dtype: str, has_keep: bool, head: int, arch: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", SPILL_SCRIPT, dtype, "1" if has_keep else "0", str(head), str(arch)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("clean") >= 3, done.stdout
