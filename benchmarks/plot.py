"""Plots of benchmark JSON: achieved fraction of copy bandwidth (or speed-up) per op and impl."""

from __future__ import annotations

from typing import Optional


def plot_suite(result: dict, path: str) -> Optional[str]:
    """Draw one bar group per (op, shape): GB/s of each impl; return the PNG path or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'sparsevit[bench]'): no plot")
        return None
    records = [r for r in result["records"] if r.get("gbps") is not None]
    if not records:
        return None
    groups = sorted({(r["op"], r["dtype"], "x".join(str(v) for v in r["shape"].values())) for r in records})
    impls = sorted({r["impl"] for r in records})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(impls)) / 2), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, g in enumerate(groups):
            match = [r for r in records if (r["op"], r["dtype"], "x".join(str(v) for v in r["shape"].values())) == g and r["impl"] == impl]
            if match:
                xs.append(i + j * width)
                ys.append(match[0]["gbps"])
        ax.bar(xs, ys, width=width, label=impl)
    copy = result.get("peaks", {}).get("copy_gbps")
    if copy:
        ax.axhline(copy, color="black", linestyle="--", linewidth=1, label=f"copy {copy:.0f} GB/s")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{op}\n{shape} {dt}" for op, dt, shape in groups], fontsize=7)
    ax.set_ylabel("GB/s")
    env = result["environment"]
    ax.set_title(f"{result['suite']} on {env['device_name']} (torch {env['torch']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
