"""Plots of benchmark JSON: GB/s against the copy bandwidth, or speed-up over the baseline.

Each plot function returns the PNG path or raises :class:`NoPlot` with the reason,
so that the runner always says which of the two happened.  A suite may define its
own ``plot(result, path)`` (blocksparse: speed-up vs sparsity; digits, sparse
training: accuracy); the others get :func:`plot_suite`.
"""

from __future__ import annotations

__all__ = ["NoPlot", "plot_bandwidth", "plot_speedups", "plot_suite", "pyplot"]


class NoPlot(RuntimeError):
    """No PNG was written; the message says why."""


def pyplot():
    """matplotlib's pyplot on the Agg backend, or :class:`NoPlot` when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise NoPlot("matplotlib is not installed (pip install 'sparsevit[bench]')") from exc
    return plt


def _timed(result: dict) -> list[dict]:
    return [r for r in result["records"] if r.get("skipped") is None and r.get("median_ms") is not None]


def _shape(r: dict) -> str:
    return "x".join(str(v) for v in r["shape"].values())


def _title(result: dict) -> str:
    env = result["environment"]
    return f"{result['suite']} on {env['device_name']} (torch {env['torch']})"


def plot_bandwidth(result: dict, path: str) -> str:
    """One bar group per (op, shape, dtype): GB/s of each impl, and the measured copy bandwidth."""
    records = [r for r in _timed(result) if r.get("gbps") is not None]
    if not records:
        raise NoPlot("no record has a GB/s figure")
    plt = pyplot()
    groups = sorted({(r["op"], r["dtype"], _shape(r)) for r in records})
    impls = sorted({r["impl"] for r in records})
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) * max(1, len(impls))), 5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, g in enumerate(groups):
            match = [r for r in records if (r["op"], r["dtype"], _shape(r)) == g and r["impl"] == impl]
            if match:
                xs.append(i + j * width)
                ys.append(match[0]["gbps"])
        ax.bar(xs, ys, width=width, label=impl)
    copy = result.get("peaks", {}).get("copy_gbps")
    if copy:
        ax.axhline(copy, color="black", linestyle="--", linewidth=1, label=f"copy {copy:.0f} GB/s")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{op}\n{shape} {dt}" for op, dt, shape in groups], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("GB/s")
    ax.set_title(_title(result), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speedups(result: dict, path: str) -> str:
    """Horizontal bars: each record's speed-up over its baseline, one bar per (op, shape, impl)."""
    records = [r for r in _timed(result) if r.get("speedup_vs_baseline") is not None]
    if not records:
        raise NoPlot("no record has a speed-up over a baseline")
    plt = pyplot()
    labels = [f"{r['op']} {_shape(r)} {r['dtype']}: {r['impl']} vs {r['baseline']}" for r in records]
    values = [r["speedup_vs_baseline"] for r in records]
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.28 * len(records)))
    ys = list(range(len(records)))[::-1]
    ax.barh(ys, values, color="tab:blue")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the baseline (log scale; > 1 is faster)")
    ax.set_title(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_suite(result: dict, path: str) -> str:
    """GB/s bars for memory-bound suites (records with GB/s), else speed-up bars."""
    if any(r.get("gbps") is not None for r in _timed(result)):
        return plot_bandwidth(result, path)
    return plot_speedups(result, path)
