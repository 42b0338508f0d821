"""Suite ``blocksparse``: a block-sparse Linear, forward and forward+backward.

GPU: ViT MLP shapes (ViT-B 768<->3072, ViT-L 1024<->4096) with M = batch x 197 tokens
(batch 64, 256), block sizes 32/64/128.  CPU: ViT-S MLP shapes (384<->1536) at batch 16, 1
and 64 and ViT-B's (768<->3072) at batch 16 and 1 (a 2-core machine needs hours for
ViT-B at batch 64), block sizes 16/32/64.  Sparsity 0/50/75/90/95%, against
-- in the same run -- dense ``F.linear`` (cuBLAS; MKL/oneDNN on the CPU), PyTorch's BSR
path (a ``to_sparse_bsr`` weight with ``F.linear``, forward only), every requested
sparsevit backend (default: cuda/triton/torch on a GPU, cpp/torch on the CPU) and stk
(``stanford-stk``, block 128, GPU) when installed.  Calls over half a second (the
largest CPU points: over 0.2 s) are sampled 3 times after one warm-up, the rest at least
5 times for at least 0.2 s.

Each record carries the FLOPs of the nonzero work (``2 M K N · density``, x3 for
forward+backward), the minimal bytes (x, the kept weight blocks and y, each once;
plus dy, dx and dW for the backward), the ideal speed-up ``1/density``, and the
roofline floor ``max(FLOPs / matmul peak, bytes / copy bandwidth)`` from peaks
measured in this run.  ``beats_dense_from`` in the printed summary is the lowest
measured sparsity at which a block size is faster than dense; ``python
benchmarks/suites/blocksparse.py RESULTS.json`` plots speed-up vs sparsity per block
size, and is the PNG that ``benchmarks/run.py`` writes for this suite.  Every
implementation is checked against the masked dense product before it is timed; a
requested sparsevit backend that cannot run is a row with the reason.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import sparsevit
from sparsevit.layout import BlockSparseLayout
from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT

if __name__ == "__main__":  # run as a script (plotting): make the harness importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Record, Runner, progress, rotating, rotation_count, time_ms  # noqa: E402
from plot import NoPlot, pyplot  # noqa: E402

TOKENS = 197
SPARSITIES = (0.0, 0.5, 0.75, 0.9, 0.95)


def _points(runner: Runner) -> list[tuple[int, int, int, int, float]]:
    """(batch, in_features, out_features, block_size, sparsity)."""
    if runner.device.type != "cuda":
        if runner.quick:
            shapes, batches, blocks, sparsities = [(128, 256)], [2], [32], (0.5, 0.9)
        else:  # ViT-S MLP shapes at batch 16/1/64, ViT-B's at batch 16/1 (hours more at batch 64 on 2 cores)
            small = [(b, i, o, bs, s) for (i, o) in [(384, 1536), (1536, 384)] for b in (16, 1, 64)
                     for bs in (16, 32, 64) for s in SPARSITIES]
            large = [(b, i, o, bs, s) for (i, o) in [(768, 3072), (3072, 768)] for b in (16, 1)
                     for bs in (16, 32, 64) for s in SPARSITIES]
            return small + large
    elif runner.quick:
        shapes, batches, blocks, sparsities = [(768, 3072)], [64], [64], (0.5, 0.9)
    else:
        shapes = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]
        batches, blocks, sparsities = [64, 256], [32, 64, 128], SPARSITIES
    return [(b, i, o, bs, s) for (i, o) in shapes for b in batches for bs in blocks for s in sparsities]


def _tolerance(dtype: torch.dtype) -> dict:
    """Outputs are O(1) (weights scaled by 1/sqrt(K))."""
    if dtype == torch.float32:
        return dict(atol=1e-3, rtol=1e-3)
    return dict(atol=3e-2, rtol=3e-2)


def run(runner: Runner) -> None:
    runner.measure_peaks(matmul=True)
    summary: dict = {}
    points = [(p, dtype) for p in _points(runner) for dtype in runner.dtypes]
    def label(point) -> str:
        (batch, fin, fout, bs, sparsity), dtype = point
        return f"M={batch * TOKENS} {fin}->{fout} block {bs} sparsity {sparsity} {dtype}"

    for (batch, fin, fout, bs, sparsity), dtype in progress(points, "blocksparse", label=label):
        _point(runner, batch, fin, fout, bs, sparsity, dtype, summary)
    for key, value in sorted(summary.items(), key=str):
        print(f"blocksparse: {key}: beats dense from sparsity {value}")


def _make_set(m: int, fin: int, fout: int, dtype: torch.dtype, dev: torch.device) -> tuple:
    x = torch.randn(m, fin, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, fout, device=dev, dtype=dtype)
    return x, dy


def _point(runner: Runner, batch: int, fin: int, fout: int, bs: int, sparsity: float, dtype: torch.dtype, summary: dict) -> None:
    dev = runner.device
    m = batch * TOKENS
    layout = BlockSparseLayout.random((fout, fin), bs, sparsity, device=dev)
    density = layout.density
    shape = {"M": m, "K": fin, "N": fout, "block": bs, "sparsity": sparsity}
    dt = str(dtype).replace("torch.", "")
    if layout.nnz_blocks == 0:
        for op in ("linear_fwd", "linear_fwd_bwd"):
            runner.skip(op, "sparsevit", None, dt, shape, f"no block of {bs}x{bs} is kept at sparsity {sparsity}")
        return
    weight = torch.randn(fout, fin, device=dev, dtype=dtype) / fin**0.5
    mat = sparsevit.BlockSparseMatrix.from_dense(weight, layout)
    values = mat.values.detach().clone().requires_grad_()
    masked = mat.to_dense().detach().requires_grad_()
    first = _make_set(m, fin, fout, dtype, dev)
    set_bytes = sum(t.numel() * t.element_size() for t in first)
    sets = [first] + [_make_set(m, fin, fout, dtype, dev) for _ in range(rotation_count(set_bytes, dev) - 1)]
    x0 = first[0]
    ref = F.linear(x0.detach().float(), masked.detach().float()).to(dtype)
    tol = _tolerance(dtype)
    es = x0.element_size()
    kept = layout.nnz_blocks * bs * bs
    fwd_flops = 2 * m * fin * fout * density
    fwd_bytes = (m * fin + kept + m * fout) * es
    bwd_bytes = fwd_bytes + (m * fout + m * fin + kept) * es  # + dy read, dx and dW written

    impls: dict[str, tuple[Callable, Optional[Callable]]] = {}
    backends, skipped = runner.split_backends(BLOCK_SPARSE_SUPPORT, [x0, values])
    for backend in backends:
        def fwd(x, dy, be=backend):
            return sparsevit.dds(x, sparsevit.BlockSparseMatrix(values, layout).t(), backend=be)

        impls[f"sparsevit[{backend}]"] = (fwd, fwd)
    dense = (lambda x, dy: F.linear(x, masked), lambda x, dy: F.linear(x, masked))
    bsr = _bsr_impl(masked, bs)
    if bsr is not None:
        impls["torch BSR"] = (bsr, None)
    stk = _stk_impl(masked, layout) if bs == 128 else None
    if stk is not None:
        impls["stk"] = (stk, stk)

    timings: dict[str, dict[str, tuple[float, float]]] = {"fwd": {}, "fwd+bwd": {}}  # name -> (ms, error)
    for name, (fwd, train) in [("F.linear", dense)] + list(impls.items()):
        third_party = name in ("torch BSR", "stk")
        try:
            with torch.no_grad():
                out = fwd(x0.detach(), None)
            if train is not None and third_party:
                _train_step(train, x0, first[1])
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            if not third_party:
                raise
            print(f"blocksparse: {name} failed at {shape} {dt}: {type(exc).__name__}: {exc}")
            continue
        err = runner.check(f"{name} {shape} {dt}", out.to(dtype), ref, **tol)
        call = rotating(sets, lambda x, dy, f=fwd: _no_grad(f, x, dy))
        timings["fwd"][name] = (time_ms(call, dev, **_reps(call, dev)), err)
        if train is not None:
            step = rotating(sets, lambda x, dy, f=train: _train_step(f, x, dy))
            timings["fwd+bwd"][name] = (time_ms(step, dev, **_reps(step, dev)), err)

    for op, flops, nbytes in (("linear_fwd", fwd_flops, fwd_bytes), ("linear_fwd_bwd", 3 * fwd_flops, bwd_bytes)):
        group = timings["fwd" if op == "linear_fwd" else "fwd+bwd"]
        base_ms = group["F.linear"][0]
        floor_ms = runner.floor_ms(flops, nbytes)
        extra = {"density": density, "ideal_speedup": 1.0 / density, "roofline_ms": floor_ms}
        dense_bytes = nbytes + (fin * fout - kept) * es * (1 if op == "linear_fwd" else 2)
        runner.add(Record("blocksparse", op, "F.linear", None, None, dt, shape, base_ms,
                          bytes=int(dense_bytes), flops=int(flops / density), extra=dict(extra)))
        for name, (ms, err) in group.items():
            if name == "F.linear":
                continue
            backend = name[len("sparsevit["):-1] if name.startswith("sparsevit[") else None
            runner.add(Record("blocksparse", op, name, backend, "F.linear", dt, shape, ms, bytes=int(nbytes),
                              flops=int(flops), speedup_vs_baseline=base_ms / ms, max_abs_error=err,
                              extra=dict(extra, frac_of_ideal=(base_ms / ms) * density)))
            if name.startswith("sparsevit[") and ms < base_ms:
                key = (op, fin, fout, batch, bs, dt, name)
                summary[key] = min(summary.get(key, 1.0), sparsity)
        for backend, reason in skipped.items():
            runner.skip(op, f"sparsevit[{backend}]", backend, dt, shape, reason, "F.linear")


def _reps(fn: Callable[[], object], dev: torch.device) -> dict:
    """Fewer warm-up calls and samples for calls over 0.2 s (large CPU points), else the defaults."""
    if dev.type == "cuda":
        return {}
    start = time.perf_counter()
    fn()
    return dict(warmup=1, min_reps=3, min_time_s=0.0) if time.perf_counter() - start > 0.2 else {}


def _no_grad(fn: Callable, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fn(x, dy)


def _train_step(fn: Callable, x: torch.Tensor, dy: torch.Tensor) -> None:
    y = fn(x, dy)
    y.backward(dy)


def _bsr_impl(masked: torch.Tensor, bs: int) -> Optional[Callable]:
    """PyTorch's BSR weight with ``F.linear`` (its Triton kernel on CUDA, MKL/ATen on the CPU), forward only."""
    try:
        w = masked.detach().to_sparse_bsr((bs, bs))
        F.linear(torch.zeros(1, masked.shape[1], device=masked.device, dtype=masked.dtype), w)
    except Exception as exc:  # noqa: BLE001 - record why the baseline is missing
        print(f"blocksparse: torch BSR unavailable ({type(exc).__name__}: {exc})")
        return None
    return lambda x, dy: F.linear(x, w)


def _stk_impl(masked: torch.Tensor, layout: BlockSparseLayout) -> Optional[Callable]:
    """stk's dds (block 128), when ``stanford-stk`` is installed."""
    try:
        import stk  # noqa: F401
        import stk.ops
    except ImportError:
        return None
    if masked.device.type != "cuda" or masked.dtype != torch.float16 and masked.dtype != torch.bfloat16:
        return None
    try:
        w_t = stk.ops.to_sparse(masked.detach().t().contiguous(), 128).requires_grad_()
    except Exception as exc:  # noqa: BLE001
        print(f"blocksparse: stk unavailable ({type(exc).__name__}: {exc})")
        return None
    return lambda x, dy: stk.ops.dds(x, w_t)


def plot_speedup(result: dict, path: str) -> str:
    """Speed-up over dense vs sparsity, one line per (block size, impl), with the ideal 1/density.

    One panel per (op, K x N, M, dtype); returns the PNG path, or raises NoPlot with the reason.
    """
    records = [r for r in result["records"] if r["suite"] == "blocksparse" and r.get("speedup_vs_baseline") is not None]
    panels = sorted({(r["op"], r["shape"]["K"], r["shape"]["N"], r["shape"]["M"], r["dtype"]) for r in records})
    if not panels:
        raise NoPlot("no record has a speed-up over F.linear")
    plt = pyplot()
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (op, k, n, m, dt) in zip(axes.flat, panels):
        mine = [r for r in records if (r["op"], r["shape"]["K"], r["shape"]["N"], r["shape"]["M"], r["dtype"]) == (op, k, n, m, dt)]
        for block, impl in sorted({(r["shape"]["block"], r["impl"]) for r in mine}):
            pts = sorted((r["shape"]["sparsity"], r["speedup_vs_baseline"]) for r in mine
                         if r["shape"]["block"] == block and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl} b={block}")
        ideal = sorted({(r["shape"]["sparsity"], r["extra"]["ideal_speedup"]) for r in mine})
        ax.plot([p[0] for p in ideal], [p[1] for p in ideal], "k--", linewidth=1, label="ideal 1/density")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speed-up over F.linear")
        ax.set_title(f"{op} {k}->{n} M={m} {dt}", fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    env = result["environment"]
    fig.suptitle(f"blocksparse on {env['device_name']} (torch {env['torch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


plot = plot_speedup  # the PNG benchmarks/run.py writes for this suite


if __name__ == "__main__":
    import json

    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/suites/blocksparse.py RESULTS.json  (writes RESULTS-speedup.png)")
    with open(sys.argv[1], encoding="utf-8") as fh:
        data = json.load(fh)
    print(plot_speedup(data, os.path.splitext(sys.argv[1])[0] + "-speedup.png"))
