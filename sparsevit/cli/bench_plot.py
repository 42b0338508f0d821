"""The one PNG of ``python -m sparsevit bench``: speed-up over the dense baseline, with its spread."""

from __future__ import annotations

import textwrap

__all__ = ["PlotUnavailable", "plot_bench"]


class PlotUnavailable(RuntimeError):
    """No plot could be drawn (the message says why: no matplotlib, nothing to plot)."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("matplotlib is not installed (pip install 'sparsevit[bench]')") from exc
    return plt


def plot_bench(result: dict, path: str) -> str:
    """Horizontal bars of each contender's speed-up, quartile ranges as error bars; returns ``path``."""
    rows = [r for r in result["rows"] if r.get("speedup") is not None]
    if not rows:
        raise PlotUnavailable("no row has a speed-up to plot")
    plt = _pyplot()
    labels = [f"{r['part']} {r['mode']}\n{r['impl']}" for r in rows]
    speed = [r["speedup"] for r in rows]
    lo = [max(0.0, r["speedup"] - r["speedup_range"][0]) for r in rows]
    hi = [max(0.0, r["speedup_range"][1] - r["speedup"]) for r in rows]
    skipped = [f"{r['part']} skipped: {r['skipped']}" for r in result["rows"] if r.get("skipped")]
    notes = [line for s in skipped for line in textwrap.wrap(s, 110)]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(rows) + 0.18 * len(notes)))
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, speed, xerr=[lo, hi], color="tab:blue", capsize=3)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("speed-up over the dense baseline (bars: median; whiskers: quartile range)")
    for y, s, h in zip(ys, speed, hi):
        ax.text(s + h, y, f"  {s:.2f}x", va="center", fontsize=7)
    env = result["environment"]
    ax.set_title(f"sparsevit bench on {env['device_name']} (torch {env['torch']})", fontsize=8)
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.025 * len(notes) * 8 / (1.2 + 0.6 * len(rows) + 0.18 * len(notes)), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
