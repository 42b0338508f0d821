"""Registers, spills and shared memory of every kernel of the CUDA extension (``csrc/*.cu``).

Two sources, per architecture:

* ``nvcc``: compile each ``.cu`` to a cubin with ``-Xptxas -v`` (the extension's own
  nvcc flags and torch's headers; device code only, no host objects) and read the
  per-kernel log: registers, spill stores/loads, stack frame, static shared memory;
  then the SASS of the cubin for the MMA family.
* ``so``: read the built ``sparsevit/_C*.so`` with ``cuobjdump -res-usage`` (and
  ``-sass``).  It gives registers, stack frame and shared memory, not the spill
  split, so ``spills`` is the stack frame there (what the spills need), and only
  architectures the extension was built for can be read.

Threads per block are the launch sites' (``KERNELS``), so the occupancy estimate of a
kernel uses the block size it is really launched with.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from .ptx_facts import sass_counts, sass_mma_family
from .ptxas_log import Resources, parse_ptxas_log, parse_res_usage
from .tools import find_nvcc, find_tool

__all__ = ["SOURCES", "KERNELS", "NVCC_FLAGS", "nvcc_resources", "so_resources", "built_extension",
           "short_name", "demangle"]

SOURCES = ("block_sparse_matmul.cu", "masked_softmax.cu", "token_gather.cu")
# Each kernel's source and the threads per block it is launched with (see its launch site).
KERNELS = {
    "rowlist_kernel": ("block_sparse_matmul.cu", 128),  # kThreads
    "sdd_kernel": ("block_sparse_matmul.cu", 128),
    "masked_softmax_fwd_kernel": ("masked_softmax.cu", 256),  # kWarp * kWarpsPerBlock
    "masked_softmax_bwd_kernel": ("masked_softmax.cu", 256),
    "move_rows_kernel": ("token_gather.cu", 256),  # dim3(kWarp, kRowsPerBlock)
    "scatter_add_rows_kernel": ("token_gather.cu", 256),
}
# setup.py's nvcc flags plus torch's CUDAExtension defaults.
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo", "-std=c++20", "-DSPARSEVIT_WITH_CUDA=1",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "c10::BFloat16": "bf16", "c10::Half": "fp16", "float": "fp32",
          "double": "fp64", "long": "i64", "int": "i32", "bool": "bool"}


def demangle(names: Sequence[str]) -> dict[str, str]:
    """``{mangled: demangled}`` with ``c++filt``; names stay mangled where it is missing."""
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    done = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    lines = done.stdout.splitlines()
    return dict(zip(names, lines)) if done.returncode == 0 and len(lines) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """``void sparsevit::(anonymous namespace)::sdd_kernel<__nv_bfloat16, 16, 32>(...)`` →
    ``sdd_kernel<bf16,16,32>``."""
    text = re.sub(r"^void\s+", "", demangled.strip()).replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(text):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            text = text[:i]
            break
    base, _, args = text.partition("<")
    base = base.split("::")[-1]
    if not args:
        return base
    parts = [p.strip() for p in args[:-1].split(",")]
    return f"{base}<{','.join(_TYPES.get(p, p) for p in parts)}>"


def _base(short: str) -> str:
    return short.split("<")[0]


def _sass_by_function(sass: str) -> dict[str, str]:
    """``{mangled name: its SASS}`` from ``cuobjdump -sass`` output."""
    out: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = m.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _record(source: str, capability: int, mangled: str, pretty: str, res: Resources, sass: str, how: str) -> dict:
    short = short_name(pretty)
    known_source, threads = KERNELS.get(_base(short), (source, None))
    return dict(
        family="cuda_ext", source=source if source.endswith(".cu") else known_source, kernel=short, mangled=mangled, arch=f"sm_{capability}",
        capability=capability, regs=res.regs, spill_stores=res.spill_stores, spill_loads=res.spill_loads,
        spills=res.spills, stack=res.stack, shared=res.smem, threads=threads,
        num_warps=threads // 32 if threads else None, sass_mma=sass_mma_family(sass) if sass else None,
        sass=sass_counts(sass) if sass else None, source_of_numbers=how,
    )


def _torch_includes() -> list[str]:
    import torch

    root = os.path.join(os.path.dirname(torch.__file__), "include")
    return [f"-I{root}", f"-I{os.path.join(root, 'torch', 'csrc', 'api', 'include')}"]


def _compile_one(nvcc: str, csrc: str, source: str, capability: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "out.cubin")
        cmd = [nvcc, "-cubin", f"-arch=sm_{capability}", *NVCC_FLAGS, f"-I{csrc}", *_torch_includes(),
               "-Xptxas", "-v", os.path.join(csrc, source), "-o", cubin]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source} for sm_{capability}:\n{done.stderr[-4000:]}\n{' '.join(cmd)}")
        sass = subprocess.run([find_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    resources = parse_ptxas_log(done.stdout + done.stderr)
    names = demangle(list(resources))
    by_fn = _sass_by_function(sass)
    return [_record(source, capability, m, names[m], r, by_fn.get(m, ""), "nvcc -Xptxas -v")
            for m, r in sorted(resources.items(), key=lambda kv: names[kv[0]])]


def nvcc_resources(csrc: str, capabilities: Sequence[int], workers: int = 2,
                   sources: Sequence[str] = SOURCES) -> list[dict]:
    """One record per kernel, source and capability, compiled with ``nvcc -Xptxas -v``."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    tasks = [(s, c) for c in capabilities for s in sources]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        parts = list(pool.map(lambda t: _compile_one(nvcc, csrc, *t), tasks))
    return [r for part in parts for r in part]


def built_extension() -> Optional[str]:
    """The path of the built ``sparsevit/_C*.so``, or None."""
    import sparsevit

    found = sorted(glob.glob(os.path.join(os.path.dirname(sparsevit.__file__), "_C*.so")))
    return found[0] if found else None


def so_resources(path: str, capabilities: Sequence[int]) -> list[dict]:
    """One record per kernel and capability the built extension holds code for
    (``cuobjdump -res-usage``; ``spills`` is the stack frame, see the module docstring)."""
    cuobjdump = find_tool("cuobjdump")
    out = []
    for cap in capabilities:
        arch = f"sm_{cap}"
        usage = subprocess.run([cuobjdump, "-res-usage", "-arch", arch, path], capture_output=True, text=True)
        if usage.returncode != 0 or "Function" not in usage.stdout:
            raise RuntimeError(f"{path} has no {arch} code (cuobjdump: {usage.stderr.strip() or 'no functions'})")
        sass = subprocess.run([cuobjdump, "-sass", "-arch", arch, path], capture_output=True, text=True).stdout
        table = parse_res_usage(usage.stdout)
        names = demangle(list(table))
        by_fn = _sass_by_function(sass)
        for mangled, row in sorted(table.items(), key=lambda kv: names[kv[0]]):
            stack = row.get("STACK", 0) + row.get("LOCAL", 0)
            res = Resources(regs=row.get("REG", 0), stack=stack, spill_stores=stack, spill_loads=0,
                            smem=max(0, row.get("SHARED", 0) - 1024))  # cuobjdump counts the 1 KB reserve
            out.append(_record(os.path.basename(path), cap, mangled, names[mangled], res, by_fn.get(mangled, ""),
                               f"cuobjdump -res-usage of {os.path.basename(path)}"))
    return out
