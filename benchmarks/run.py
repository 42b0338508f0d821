"""Run one benchmark suite: check against the references, time, print a table, write JSON and a PNG.

    python benchmarks/run.py --suite tokens --out benchmarks/results/tokens-h100-2026-11-23.json

``--quick`` runs a small set of points.  Every suite writes a PNG next to the JSON
(blocksparse: speed-up vs sparsity), or prints why it could not (no matplotlib,
nothing to plot, ``--no-plot``).  A sparsevit backend that cannot run here keeps its
row, with the reason.  Progress (case, elapsed, ETA) goes to stderr, one line per case.
The headline benchmark of a whole ViT is ``python -m sparsevit bench``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import Runner, format_table  # noqa: E402
from plot import NoPlot, plot_suite  # noqa: E402

from sparsevit.backend import BACKENDS  # noqa: E402
from sparsevit.cli.env import DeviceError, resolve_device  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SUITES = sorted(name[:-3] for name in os.listdir(os.path.join(HERE, "suites")) if name.endswith(".py") and not name.startswith("_"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, choices=SUITES)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="a few small points only")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--backend", action="append", choices=list(BACKENDS),
                   help="repeatable (default: cuda, triton, torch on a GPU; cpp, torch on the CPU); "
                        "a requested backend that cannot run is a row with the reason")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 2
    if args.dtype:
        dtypes = [DTYPES[d] for d in args.dtype]
    else:
        dtypes = [torch.bfloat16] if device.type == "cuda" else [torch.float32]
    backends = args.backend or (["cuda", "triton", "torch"] if device.type == "cuda" else ["cpp", "torch"])
    runner = Runner(args.suite, device, args.quick, dtypes, backends, backends_explicit=bool(args.backend))
    suite = importlib.import_module(f"suites.{args.suite}")
    suite.run(runner)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(runner.to_json(), fh, indent=1)
    env = runner.env
    print(f"\n{args.suite} on {env['device_name']} | torch {env['torch']} | triton {env['triton']} | cuda {env['cuda']}")
    print("peaks: " + ", ".join(f"{k}={v:.1f}" for k, v in runner.peaks.items()))
    # A suite with its own table (e.g. accuracy) prints that one instead of the generic one.
    print(getattr(suite, "format_records", format_table)(runner.records))
    print(f"\nwrote {args.out}")
    if args.no_plot:
        print("no plot: --no-plot")
        return 0
    try:
        png = getattr(suite, "plot", plot_suite)(runner.to_json(), os.path.splitext(args.out)[0] + ".png")
        print(f"wrote {png}")
    except NoPlot as exc:
        print(f"no plot: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
