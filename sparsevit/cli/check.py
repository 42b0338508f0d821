"""``python -m sparsevit check``: every op on every backend of this device against the reference.

For each op, backend and dtype (float32, float16, bfloat16) the cases of
:mod:`sparsevit.cli.check_cases` run forward and backward on fresh random inputs;
the output and every input gradient are compared with the reference evaluated in
float64 on the same values.  A case passes when its largest error is within

    max(rtol · max(1, max|ref|),  2 · error of the reference itself run in that dtype)

with ``rtol`` = 1e-4 for float32, 1e-2 for float16 and 1.6e-2 for bfloat16 (twice its
epsilon, as the project's op tests allow), and the second term what the dtype's
rounding alone costs.  A
backend that cannot run here is listed with the reason, never silently left out.
The exit status is 1 when any case fails, else 0; ``--json PATH`` writes one record
per op × backend × dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from ..backend import BACKENDS, OpSupport
from .check_cases import CASES, OPS, Case
from .env import environment, resolve_device
from .table import format_table

__all__ = ["DTYPES", "RTOL", "add_parser", "check_one", "run", "run_checks"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# bfloat16's epsilon (7.8e-3) is close to 1e-2 itself: allow two of it, as the op tests do
RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}


def _support(op: str) -> OpSupport:
    from ..ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
    from ..ops.masked_attention import MASKED_ATTENTION_SUPPORT
    from ..ops.masked_softmax import MASKED_SOFTMAX_SUPPORT
    from ..ops.token_gather import TOKEN_SUPPORT

    if op in ("dds", "dsd", "sdd"):
        return BLOCK_SPARSE_SUPPORT
    if op == "masked_softmax":
        return MASKED_SOFTMAX_SUPPORT
    if op == "masked_attention":
        return MASKED_ATTENTION_SUPPORT
    return TOKEN_SUPPORT


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def _scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0


def _compare(name: str, got: Optional[torch.Tensor], ref: Optional[torch.Tensor], own: Optional[torch.Tensor],
             rtol: float) -> dict:
    """One output or gradient: its error, the bound it must meet, and whether it does."""
    if ref is None:
        return {"name": name, "error": 0.0, "rel_error": 0.0, "bound": 0.0, "ok": got is None,
                **({} if got is None else {"problem": "a gradient where the reference has none"})}
    if got is None:
        return {"name": name, "error": None, "rel_error": None, "bound": None, "ok": False, "problem": "no gradient"}
    if tuple(got.shape) != tuple(ref.shape):
        return {"name": name, "error": None, "rel_error": None, "bound": None, "ok": False,
                "problem": f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}"}
    err, scale = _max_err(got, ref), _scale(ref)
    bound = max(rtol * scale, 2.0 * _max_err(own, ref))
    # `not (err <= bound)` so that a NaN error fails
    return {"name": name, "error": err, "rel_error": err / scale, "bound": bound, "ok": not (err > bound or err != err)}


def _leaf_copies(leaves: dict, dtype: Optional[torch.dtype] = None) -> dict:
    out = {}
    for k, v in leaves.items():
        t = v.detach().clone() if dtype is None else v.detach().to(dtype)
        out[k] = t.requires_grad_()
    return out


def check_one(case: Case, backend: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Run one case on one backend: ``{"status": "pass"|"fail"|"unavailable", ...}`` with its errors."""
    gen = torch.Generator().manual_seed(seed)
    inputs = case.make(device, dtype, gen)
    tensors = case.support_tensors(inputs.leaves, inputs.fixed)
    reason = _support(case.op).reject_reason(backend, tensors, dtype, device.type)
    result: dict = {"case": case.label}
    if reason is not None:
        return {**result, "status": "unavailable", "reason": reason}
    rtol = RTOL[dtype]
    ours = _leaf_copies(inputs.leaves)
    try:
        out = case.ours(ours, inputs.fixed, backend)
        exact = _leaf_copies(inputs.leaves, torch.float64)
        ref = case.ref(exact, inputs.fixed)
        same = _leaf_copies(inputs.leaves)
        own = case.ref(same, inputs.fixed)
        checks = [_compare("out", out, ref, own, rtol)]
        problems = []
        if out.dtype != dtype:
            problems.append(f"output dtype {out.dtype}, expected {dtype}")
        if case.extra is not None:
            extra = case.extra(ours, inputs.fixed, backend)
            if extra:
                problems.append(extra)
        if checks[0]["ok"] and out.requires_grad:
            upstream = torch.randn(tuple(ref.shape), generator=gen, dtype=torch.float64).to(device)
            out.backward(upstream.to(out.dtype))
            ref.backward(upstream)
            own.backward(upstream.to(own.dtype))
            for name in inputs.leaves:
                checks.append(_compare(f"d{name}", ours[name].grad, exact[name].grad, same[name].grad, rtol))
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported with its message
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {**result, "status": "fail", "problem": f"{type(exc).__name__}: {message}", "checks": []}
    problems += [f"{c['name']}: {c['problem']}" for c in checks if "problem" in c]
    problems += [f"{c['name']}: error {c['error']:.3g} > bound {c['bound']:.3g}" for c in checks
                 if not c["ok"] and "problem" not in c]
    rel = [c["rel_error"] for c in checks if c["rel_error"] is not None]
    return {**result, "status": "fail" if problems else "pass", "problem": "; ".join(problems) or None,
            "checks": checks, "max_rel_error": max(rel) if rel else None}


def run_checks(device: torch.device, ops: Sequence[str], backends: Sequence[str], dtypes: Sequence[torch.dtype]) -> list[dict]:
    """One record per op × backend × dtype, each with its cases."""
    records = []
    for op in ops:
        cases = [c for c in CASES if c.op == op]
        for backend in backends:
            for dtype in dtypes:
                start = time.perf_counter()
                results = [check_one(c, backend, device, dtype, seed=i) for i, c in enumerate(cases)]
                ran = [r for r in results if r["status"] != "unavailable"]
                if not ran:
                    status = "unavailable"
                else:
                    status = "fail" if any(r["status"] == "fail" for r in ran) else "pass"
                rel = [r["max_rel_error"] for r in ran if r.get("max_rel_error") is not None]
                records.append({
                    "op": op, "backend": backend, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
                    "status": status,
                    "reason": results[0].get("reason") if status == "unavailable" else None,
                    "max_rel_error": max(rel) if rel else None,
                    "rtol": RTOL[dtype], "cases": results, "seconds": time.perf_counter() - start,
                })
    return records


def _cell(rec: dict) -> str:
    if rec["status"] == "unavailable":
        return "n/a"
    err = rec["max_rel_error"]
    tag = "ok" if rec["status"] == "pass" else "FAIL"
    return tag if err is None else f"{tag} {err:.1e}"


def render(records: list[dict], env: dict) -> str:
    """The pass/fail table, the reasons for n/a, and the details of failures."""
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    keys = list(dict.fromkeys((r["op"], r["backend"]) for r in records))
    by = {(r["op"], r["backend"], r["dtype"]): r for r in records}
    rows = [[op, be] + [_cell(by[(op, be, dt)]) for dt in dtypes] for op, be in keys]
    head = (f"sparsevit check on {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
            f"CUDA {env['cuda']}" + (" | TRITON_INTERPRET=1" if env["triton_interpret"] else ""))
    lines = [head, "", format_table(["op", "backend", *dtypes], rows), "",
             "number: largest error of the output and input gradients, relative to max(1, |reference|);",
             "limit 1e-4 (float32), 1e-2 (float16), 1.6e-2 (bfloat16), or twice the reference's own error in that dtype."]
    unavailable: dict = {}
    for r in records:
        if r["status"] == "unavailable":
            unavailable.setdefault((r["backend"], r["reason"]), []).append(r["op"])
    if unavailable:
        lines += ["", "not available on this device:"]
        for (backend, reason), op_list in unavailable.items():
            names = list(dict.fromkeys(op_list))
            which = "every op" if len(names) == len(OPS) else ", ".join(names)
            lines.append(f"  {backend} ({which}): {reason}")
    failed = [(r, c) for r in records for c in r["cases"] if c["status"] == "fail"]
    if failed:
        lines += ["", "failures:"]
        lines += [f"  {r['op']}[{r['backend']}] {r['dtype']} {c['case']}: {c['problem']}" for r, c in failed]
    n_fail = len({(r["op"], r["backend"], r["dtype"]) for r, _ in failed})
    n_pass = sum(r["status"] == "pass" for r in records)
    lines += ["", f"{n_pass} passed, {n_fail} failed, {sum(r['status'] == 'unavailable' for r in records)} not available"]
    return "\n".join(lines)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register the ``check`` subcommand and its options."""
    p = sub.add_parser("check", help="every op on every backend of this device against the reference",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible, else cpu)")
    p.add_argument("--json", metavar="PATH", help="write one record per op x backend x dtype")
    p.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable (default: every backend)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default: all three)")
    p.add_argument("--op", action="append", choices=OPS, help="repeatable (default: every op)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m sparsevit check`` with parsed ``args``; the exit status."""
    device = resolve_device(args.device)
    env = environment(device)
    records = run_checks(device, args.op or OPS, args.backend or BACKENDS, [DTYPES[d] for d in (args.dtype or DTYPES)])
    print(render(records, env))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"environment": env, "records": records}, fh, indent=1)
        print(f"wrote {args.json}")
    failed = any(r["status"] == "fail" for r in records)
    if failed:
        print("check FAILED: do not trust the failing backends on this device", file=sys.stderr)
    return 1 if failed else 0
