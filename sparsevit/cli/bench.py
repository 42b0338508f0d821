"""``python -m sparsevit bench``: does sparsity make my ViT faster, here?

On whatever device is present, each against its dense baseline in the same run
(see :mod:`sparsevit.cli.bench_cases`): a ViT with block-sparse MLPs (inference and
a training step), DynamicViT (inference), and on a GPU the fused masked attention.
Prints a table of medians with their spread (interquartile range) and speed-ups
with their quartile range, and writes ``bench-<device>-<date>.json`` and one PNG to
``--out``.  ``--quick`` takes about 1-2 minutes on a 2-thread CPU and well under a
minute on a GPU; machine load shows up as spread, flagged in the table.
The exit status is 1 when a contender fails its correctness check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from typing import Optional

import torch

from .bench_cases import Plan, Row, plan_for, run_attention, run_models
from .bench_plot import PlotUnavailable, plot_bench
from .env import environment, resolve_device
from .progress import Progress
from .table import format_ms, format_table
from .timing import NOISY_SPREAD

__all__ = ["add_parser", "render", "run", "run_bench"]


def run_bench(device: torch.device, plan: Plan) -> dict:
    """Measure everything of ``plan`` on ``device``; the JSON-ready result."""
    n_attention = 2 * len(plan.attention) if device.type == "cuda" else 0
    bar = Progress(3 + n_attention, "bench")
    rows: list[Row] = run_models(plan, device, bar) + run_attention(plan, device, bar)
    plan_dict = {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in plan.__dict__.items()}
    return {"environment": environment(device), "plan": plan_dict, "rows": [r.as_dict() for r in rows],
            "timing": ("model steps: interleaved rounds, a synchronise per step; kernels: "
                       + ("triton.testing.do_bench" if device.type == "cuda" else "wall clock"))}


def _speedup_cell(row: dict) -> str:
    if row.get("speedup") is None:
        return ""
    lo, hi = row["speedup_range"]
    noise = " (noise)" if lo < 1.0 < hi else ""
    return f"{row['speedup']:.2f}x [{lo:.2f}-{hi:.2f}]{noise}"


def _throughput(row: dict) -> str:
    if row.get("img_per_s") is not None:
        return f"{row['img_per_s']:.1f} img/s"
    if row.get("tflops") is not None:
        return f"{row['tflops']:.1f} TFLOP/s"
    return ""


def _shape(row: dict) -> str:
    s = row["setting"]
    if "model" in s:
        return f"batch {s['batch']}"
    if "B" in s:
        return f"{s['B']}x{s['H']}x{s['N']}x{s['D']}"
    return ""


def render(result: dict) -> str:
    """The headline table, with its settings above and its caveats below."""
    env, plan = result["environment"], result["plan"]
    model_row = next((r for r in result["rows"] if "model" in r["setting"]), None)
    lines = [f"sparsevit bench on {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
             f"CUDA {env['cuda']} | timm {env['timm']}"]
    if model_row is not None:
        s = model_row["setting"]
        lines.append(f"model {s['model']} (random weights), {s['dtype']}, timm attention {s['timm_attention']}, "
                     f"no torch.compile; block-sparse MLPs: {round(100 * plan['sparsity'])}% of {plan['block']}x"
                     f"{plan['block']} blocks dropped; DynamicViT keep ratio {plan['keep_ratio']}")
    rows, noisy, notes = [], [], []
    for r in result["rows"]:
        t = r["timing"]
        if r.get("skipped"):
            notes.append(f"[{len(notes) + 1}] {r['part']} {r['mode']}, {r['impl']}: {r['skipped']}")
            rows.append([r["part"], r["mode"], r["impl"], _shape(r), "skipped", f"[{len(notes)}]", "", ""])
            continue
        flag = ""
        if t["rel_iqr"] > NOISY_SPREAD:
            flag = " !"
            noisy.append(r)
        rows.append([r["part"], r["mode"], r["impl"], _shape(r), format_ms(t["median_ms"]),
                     f"{100 * t['rel_iqr']:.0f}% (n={t['n']}){flag}", _throughput(r), _speedup_cell(r)])
    lines += ["", format_table(["part", "mode", "impl", "shape", "median ms", "IQR/median", "throughput",
                                "vs dense [quartile range]"], rows), ""]
    lines += notes
    lines.append("speed-up range: baseline quartiles over ours (q1/q3 .. q3/q1); '(noise)': the range includes 1x.")
    if noisy:
        lines.append(f"warning: {len(noisy)} row(s) marked '!' have an interquartile range above "
                     f"{100 * NOISY_SPREAD:.0f}% of the median: the machine is busy or the step is short; "
                     "read their ratios as rough and rerun on an idle machine.")
    failed = [r for r in result["rows"] if r.get("check") and not r["check"]["ok"]]
    for r in failed:
        lines.append(f"CHECK FAILED: {r['impl']}: error {r['check']['max_rel_error']:.3g} against the "
                     f"{r['check']['against']} (tolerance {r['check']['tolerance']:.0e})")
    return "\n".join(lines)


def add_parser(sub: "argparse._SubParsersAction") -> None:
    """Register the ``bench`` subcommand and its options."""
    p = sub.add_parser("bench", help="the headline benchmark: sparse ViTs against dense, on this device",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible, else cpu)")
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer rounds (about 1-2 minutes on a CPU)")
    p.add_argument("--out", default="bench-out", help="folder for the JSON and PNG (default: bench-out)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long runs for the tests
    p.set_defaults(func=run)


def _write(result: dict, out: str, device: torch.device, plot: bool) -> tuple[str, Optional[str], Optional[str]]:
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"bench-{device.type}-{datetime.date.today().isoformat()}")
    with open(stem + ".json", "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    if not plot:
        return stem + ".json", None, "--no-plot"
    try:
        return stem + ".json", plot_bench(result, stem + ".png"), None
    except PlotUnavailable as exc:
        return stem + ".json", None, str(exc)


def run(args: argparse.Namespace) -> int:
    """Run ``python -m sparsevit bench`` with parsed ``args``; the exit status."""
    device = resolve_device(args.device)
    result = run_bench(device, plan_for(device, args.quick, args.tiny))
    print(render(result))
    json_path, png, why = _write(result, args.out, device, not args.no_plot)
    print(f"\nwrote {json_path}")
    print(f"wrote {png}" if png else f"no PNG: {why}")
    return 1 if any(r.get("check") and not r["check"]["ok"] for r in result["rows"]) else 0
