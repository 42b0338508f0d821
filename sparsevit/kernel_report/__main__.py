"""``python -m sparsevit.kernel_report``: registers, spills, shared memory, occupancy and
instruction choices of every kernel, for sm_80 and sm_90, without a GPU.

Compiles every ``@triton.jit`` kernel of ``sparsevit.kernels`` for each autotune config
(:mod:`.triton_compile`) and reads the CUDA extension's kernels (:mod:`.cuda_resources`),
then prints a table and a summary and optionally writes JSON.  Exit status 0 when
everything compiled, 1 when a config failed to compile, 2 for a kernel without a spec.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from typing import Optional, Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsevit.kernel_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--kernels", default="", help="comma-separated patterns: keep kernels whose 'family/kernel' contains one")
    p.add_argument("--dtypes", default="", help="comma-separated: keep launches of these dtypes (fp32, fp16, bf16)")
    p.add_argument("--subset", default=None, help="a named subset of launches: quick (every kernel once) or ci")
    p.add_argument("--max-configs", type=int, default=None, help="at most this many autotune configs per launch")
    p.add_argument("-j", "--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="compile workers")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON to PATH")
    p.add_argument("--cuda", choices=("auto", "nvcc", "so", "none"), default="auto",
                   help="CUDA extension kernels: compile csrc/*.cu with nvcc, read the built .so, or skip (default auto)")
    p.add_argument("--csrc", default=None, help="the CUDA sources (default: csrc/ beside the package)")
    p.add_argument("--table", choices=("full", "summary", "none"), default="full", help="what to print")
    return p


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return not patterns or any(p in name for p in patterns)


def _default_csrc() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(here, "csrc")
    return path if os.path.isdir(path) else None


def _tool_version(cmd: Sequence[str]) -> Optional[str]:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    release = [line for line in out if "release" in line]
    return (release or out or [None])[-1]


def _cuda_records(args: argparse.Namespace, caps: Sequence[int], patterns: Sequence[str]) -> tuple[list[dict], str]:
    """The CUDA extension's records (those ``patterns`` select) and a note on where they came from."""
    from . import cuda_resources as cr
    from .tools import find_nvcc

    if args.cuda == "none":
        return [], "skipped (--cuda none)"
    names = [f"cuda_ext/{source}:{kernel}" for kernel, (source, _) in cr.KERNELS.items()]
    if patterns and not any(_matches(n, patterns) for n in names):
        return [], "skipped (no CUDA kernel matches --kernels)"
    csrc = args.csrc or _default_csrc()
    if args.cuda == "nvcc" or (args.cuda == "auto" and find_nvcc() and csrc):
        if not csrc:
            raise SystemExit("--cuda nvcc needs the CUDA sources: pass --csrc")
        records, note = cr.nvcc_resources(csrc, caps, workers=args.jobs), "nvcc -Xptxas -v"
    else:
        so = cr.built_extension()
        if so is None:
            if args.cuda == "so":
                raise SystemExit("--cuda so: sparsevit._C is not built")
            return [], "skipped (no nvcc and no built extension)"
        records, missing = [], []
        for cap in caps:
            try:
                records += cr.so_resources(so, [cap])
            except RuntimeError:
                missing.append(f"sm_{cap}")
        note = "cuobjdump -res-usage of the built extension" + (f" (no code for {', '.join(missing)})" if missing else "")
    return [r for r in records if _matches(f"cuda_ext/{r['source']}:{r['kernel']}", patterns)], note


def _jobs(launches: Sequence, args: argparse.Namespace, caps: Sequence[int]) -> list:
    """The compile jobs of the chosen launches, configs and architectures, each once."""
    from . import subsets
    from .triton_specs import compile_jobs

    seen, jobs = set(), []
    for launch, n, only in subsets.select(launches, args.subset, args.max_configs):
        for job in compile_jobs(launch, [c for c in caps if only is None or c in only], n):
            if job.key not in seen:
                seen.add(job.key)
                jobs.append(job)
    return jobs


def _meta(args: argparse.Namespace, argv: Sequence[str], records: Sequence[dict], triton_seconds: float,
          seconds: float, cuda_note: str) -> dict:
    """When, with what and how long: the report's ``meta``."""
    import torch
    import triton

    from .tools import find_nvcc, find_tool

    nvcc = find_nvcc()
    return dict(
        date=datetime.date.today().isoformat(), command="python -m sparsevit.kernel_report " + " ".join(argv),
        triton=triton.__version__, torch=torch.__version__, ptxas=_tool_version([find_tool("ptxas"), "--version"]),
        nvcc=_tool_version([nvcc, "--version"]) if nvcc else None, python=platform.python_version(),
        workers=args.jobs, cpus=os.cpu_count(), triton_compiles=len(records),
        cached=sum(bool(r.get("cached")) for r in records),
        triton_seconds=round(triton_seconds, 1), seconds=round(seconds, 1), cuda_ext=cuda_note,
    )


def _print(args: argparse.Namespace, doc: dict) -> None:
    from . import report

    if args.table == "full":
        if doc["triton"]:
            print(report.triton_table(doc["triton"]), end="\n\n")
        if doc["cuda_ext"]:
            print(report.cuda_table(doc["cuda_ext"]), end="\n\n")
    if args.table != "none":
        meta = doc["meta"]
        print(report.summary_table(doc["summary"]))
        print(f"\n{meta['triton_compiles']} Triton compiles ({meta['cached']} cached) in {meta['triton_seconds']} s; "
              f"CUDA extension: {meta['cuda_ext']}; total {meta['seconds']} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the report; see the module docstring for the exit status."""
    from .runner import clean_environment

    clean_environment()  # before any kernel module is imported: the report needs compiled kernels
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from . import report, specs
    from .runner import run_jobs
    from .triton_specs import SpecError

    try:
        caps = [int(a) for a in _patterns(args.arch)]
    except ValueError:
        raise SystemExit(f"--arch must be comma-separated integers like 80,90, got {args.arch!r}") from None
    patterns = _patterns(args.kernels)
    start = time.perf_counter()
    try:
        dtypes = _patterns(args.dtypes)
        launches = [launch for launch in specs.launches(patterns=patterns) if _matches(f"{launch.family}/{launch.kernel}", patterns)
                    and (not dtypes or launch.labels.get("dtype") in dtypes)]
        jobs = _jobs(launches, args, caps)
    except SpecError as exc:
        print(f"python -m sparsevit.kernel_report: error: {exc}", file=sys.stderr)
        return 2
    print(f"compiling {len(jobs)} Triton kernel configs for {', '.join(f'sm_{c}' for c in caps)} on {args.jobs} workers",
          file=sys.stderr)
    triton_records = [report.with_occupancy(r) for r in run_jobs(jobs, args.jobs)]
    triton_seconds = time.perf_counter() - start
    cuda_records, cuda_note = _cuda_records(args, caps, patterns)
    cuda_records = [report.with_occupancy(r) for r in cuda_records]
    meta = _meta(args, argv, triton_records, triton_seconds, time.perf_counter() - start, cuda_note)
    doc = report.document(triton_records, cuda_records, meta)
    _print(args, doc)
    errors = [r for r in triton_records if r.get("error")]
    for r in errors[:20]:
        print(f"error: {r['variant']} {r['arch']}: {r['error'][:500]}", file=sys.stderr)
    if args.json:
        report.write_json(doc, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
