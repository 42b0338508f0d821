"""Suite ``tickets``: the lottery-ticket family and distillation on CPU-sized data, every row over seeds.

Four parts, each a module ``suites._tickets_<part>`` with ``experiment(seed, quick) -> rows``
(read their docstrings for the exact protocol):

* ``universal`` -- universal tickets (Burkholz et al. 2022): a frozen supermask / IMP ticket
  with one new linear head per target task, against linear probes on dense networks;
* ``multiview`` -- ensembles, distillation and self-distillation on multi-view data
  (Allen-Zhu & Li 2023);
* ``peekaboo`` -- Peek-a-Boo (prune at init, learn signs only; Chen et al. 2022) against
  edge-popup at the same sparsity: accuracy and wall time;
* ``rst`` -- Dual LTH / RST (Bai et al. 2022) against training the same random mask directly.

A row is ``{"experiment", "method", "setting", "top1", "sparsity", "train_s", ...}``; each
becomes a :class:`Record` (``op`` = experiment, ``impl`` = method, ``shape`` = setting plus
the seed, ``median_ms`` = the training wall time in ms, the rest in ``extra``).  The table
(:func:`tickets_table`) gives per (experiment, method, setting) the mean top1 over the
seeds with its standard deviation and range.  Every model is tiny: one intra-op thread
(fastest and steadiest on a shared CPU).  ``--quick``: one seed, shorter schedules.
"""

from __future__ import annotations

import json
import statistics
from collections import OrderedDict
from typing import Callable

import torch

from harness import Progress, Record, Runner
from plot import NoPlot, pyplot
from suites import _tickets_multiview, _tickets_peekaboo, _tickets_rst, _tickets_universal

PARTS: dict[str, Callable[[int, bool], list[dict]]] = {
    "universal": _tickets_universal.experiment,
    "multiview": _tickets_multiview.experiment,
    "peekaboo": _tickets_peekaboo.experiment,
    "rst": _tickets_rst.experiment,
}
SEEDS, SEEDS_QUICK = (0, 1, 2), (0,)
ROW_KEYS = ("experiment", "method", "setting", "top1", "sparsity", "train_s")


def to_record(row: dict, seed: int) -> Record:
    """One experiment row as a :class:`Record` of suite ``tickets`` (see the module docstring)."""
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"a tickets row lacks {missing}: {row}")
    extra = {k: v for k, v in row.items() if k not in ("experiment", "method", "setting", "train_s")}
    return Record("tickets", row["experiment"], row["method"], None, None, "float32",
                  {**row["setting"], "seed": seed}, 1e3 * float(row["train_s"]), extra=extra)


def run(runner: Runner) -> None:
    if runner.device.type != "cpu":
        print("tickets: the accuracy suite runs on the CPU")
    seeds = SEEDS_QUICK if runner.quick else SEEDS
    bar = Progress(len(PARTS) * len(seeds), "tickets")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for part, experiment in PARTS.items():
            for seed in seeds:
                for row in experiment(seed, runner.quick):
                    runner.add(to_record(row, seed))
                bar.advance(f"{part} seed {seed}")
    finally:
        torch.set_num_threads(threads)


def _field(r, name: str):
    return getattr(r, name) if isinstance(r, Record) else r[name]


def grouped(records: list) -> "OrderedDict[tuple, list]":
    """``(experiment, method, setting without the seed) -> records``, in first-seen order (Records or dicts)."""
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in records:
        setting = {k: v for k, v in _field(r, "shape").items() if k != "seed"}
        key = (_field(r, "op"), _field(r, "impl"), json.dumps(setting, sort_keys=True))
        groups.setdefault(key, []).append(r)
    return groups


def summary(rs: list) -> dict:
    """Mean, standard deviation (0 for one seed), min and max of top1; means of sparsity and train seconds."""
    top1 = [float(_field(r, "extra")["top1"]) for r in rs]
    return {
        "n": len(top1),
        "mean": statistics.fmean(top1),
        "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
        "min": min(top1),
        "max": max(top1),
        "sparsity": statistics.fmean(float(_field(r, "extra")["sparsity"]) for r in rs),
        "train_s": statistics.fmean(float(_field(r, "median_ms")) / 1e3 for r in rs),
    }


def tickets_table(records: list) -> str:
    """Markdown: experiment, method, setting, mean top1 ± std (min–max) over n seeds, sparsity, train s."""
    lines = ["| experiment | method | setting | top1 (mean ± std, min–max) | seeds | sparsity | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (op, impl, setting), rs in grouped(records).items():
        s = summary(rs)
        cell = ", ".join(f"{k}={v}" for k, v in json.loads(setting).items())
        lines.append(f"| {op} | {impl} | {cell} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} "
                     f"({100 * s['min']:.1f}–{100 * s['max']:.1f}) | {s['n']} | {100 * s['sparsity']:.0f}% | "
                     f"{s['train_s']:.1f} |")
    return "\n".join(lines)


format_records = tickets_table  # the table benchmarks/run.py prints for this suite


def plot(result: dict, path: str) -> str:
    """Mean test top1 per (experiment, method, setting) with the seeds' standard deviation."""
    records = [r for r in result["records"] if "top1" in r.get("extra", {})]
    if not records:
        raise NoPlot("no record has a top1")
    groups = grouped(records)
    plt = pyplot()
    ops = sorted({k[0] for k in groups})
    colours = {op: f"C{i}" for i, op in enumerate(ops)}
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.22 * len(groups)))
    ys = list(range(len(groups)))[::-1]
    stats = [summary(rs) for rs in groups.values()]
    ax.barh(ys, [100 * s["mean"] for s in stats], xerr=[100 * s["std"] for s in stats],
            color=[colours[k[0]] for k in groups])
    ax.set_yticks(ys)
    labels = [f"{op}: {impl} " + ", ".join(f"{k}={v}" for k, v in json.loads(st).items() if k != "steps")
              for op, impl, st in groups]
    ax.set_yticklabels(labels, fontsize=5)
    ax.set_xlabel("test top1 (%), mean ± std over seeds")
    env = result["environment"]
    ax.set_title(f"tickets on {env['device_name']} (torch {env['torch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
