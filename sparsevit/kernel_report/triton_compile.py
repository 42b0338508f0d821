"""Compile one Triton kernel configuration for a GPU architecture, without a GPU, and read its resources.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32), options=...)``
runs the whole pipeline down to a cubin on the CPU.  Registers and spills come from
the ``ptxas -v`` log of that very compile (Triton's own ``ptxas`` call, captured with
``TRITON_DUMP_PTXAS_LOG``); shared memory and warps from the compiled metadata; the MMA
family, async copies and vector widths from the PTX and SASS (:mod:`.ptx_facts`).

Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) makes a rerun cheap:
the ptxas log and the SASS are kept beside the cubin in the same cache entry, so a
cached kernel needs neither a compile nor a disassembly.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tempfile
import time
from typing import Any, Optional

from .ptx_facts import ptx_facts, sass_counts, sass_mma_family
from .ptxas_log import parse_ptxas_log
from .tools import find_tool
from .triton_specs import CompileJob, kernel_fn

__all__ = ["compile_job", "disassemble"]

LOG_FILE = "sparsevit_kernel_report.ptxas.log"
SASS_FILE = "sparsevit_kernel_report.sass"


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin (``cuobjdump -sass``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        done = subprocess.run([find_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, timeout=300)
    finally:
        os.remove(path)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {done.stderr.strip()}")
    return done.stdout


def _compile(job: CompileJob, force: bool) -> tuple[Any, Optional[str]]:
    """``(compiled kernel, ptxas log or None on a cache hit)``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_fn(job.module, job.kernel)
    src = ASTSource(fn, dict(job.signature), constexprs=dict(job.constexprs), attrs=dict(job.attrs))
    out = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = force
        compiled = triton.compile(src, target=GPUTarget("cuda", job.capability, 32), options=dict(job.options))
    log = out.getvalue()
    return compiled, (log if "ptxas info" in log else None)


def _artifacts(job: CompileJob) -> tuple[Any, str, str, bool]:
    """``(compiled, ptxas log, SASS, whether it all came from the cache)``."""
    from triton.runtime.cache import get_cache_manager

    compiled, log = _compile(job, force=False)
    cache = get_cache_manager(compiled.hash)
    cached_log, cached_sass = cache.get_file(LOG_FILE), cache.get_file(SASS_FILE)
    if log is None and cached_log and cached_sass:
        with open(cached_log) as fh_log, open(cached_sass) as fh_sass:
            return compiled, fh_log.read(), fh_sass.read(), True
    if log is None:  # cached by an earlier run that kept no log: compile again to see it
        compiled, log = _compile(job, force=True)
        if log is None:
            raise RuntimeError("Triton's compile printed no ptxas log")
    sass = disassemble(compiled.asm["cubin"])
    cache.put(log, LOG_FILE, binary=False)
    cache.put(sass, SASS_FILE, binary=False)
    return compiled, log, sass, False


def _facts(compiled: Any, log: str, sass: str) -> dict:
    meta = compiled.metadata
    resources = parse_ptxas_log(log)
    if meta.name not in resources:
        raise RuntimeError(f"the ptxas log has no entry {meta.name!r} (it has {', '.join(resources) or 'none'})")
    res = resources[meta.name]
    ptx = ptx_facts(compiled.asm["ptx"])
    counts = sass_counts(sass)
    return dict(
        regs=res.regs, spill_stores=res.spill_stores, spill_loads=res.spill_loads,
        spills=res.spills, stack=res.stack, shared=int(meta.shared or 0), num_warps=int(meta.num_warps),
        threads=int(meta.num_warps) * 32, **ptx.as_dict(), sass_mma=sass_mma_family(sass),
        sass=dict(counts),
    )


def compile_job(job: CompileJob) -> dict:
    """Compile ``job`` and return its record: the job's identity plus registers, spills, shared
    memory, MMA family, async copies and vector widths.  A failed compile is a record with
    ``"error"``, not an exception, so one bad config does not hide the others."""
    os.environ.pop("TRITON_INTERPRET", None)
    record: dict = dict(
        family=job.family, kernel=job.kernel, arch=f"sm_{job.capability}", capability=job.capability,
        labels=dict(job.labels), config=dict(job.config), num_stages=job.num_stages, variant=job.variant,
        tensor_cores=job.tensor_cores,
    )
    start = time.perf_counter()
    try:
        compiled, log, sass, cached = _artifacts(job)
        record.update(_facts(compiled, log, sass), cached=cached)
    except Exception as exc:  # noqa: BLE001 - reported per config
        text = f"{type(exc).__name__}: {exc}".strip()
        record["error"] = text if len(text) < 2000 else text[:1000] + " ... " + text[-800:]
        record.setdefault("num_warps", job.num_warps)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record
