"""Suite ``sparse_training``: accuracy of sparse training methods on real data, on the CPU, in minutes.

Data: scikit-learn's handwritten digits (1,797 8×8 grey images, 10 classes;
shipped with scikit-learn, no download), a fixed 75/25 split.  Model: a timm
``VisionTransformer`` (patch 2 → 16 tokens, embed 64, depth 2, 4 heads, MLP 128),
trained with AdamW from the same initialisation for every method.

* dense vs RigL vs SET vs static sparse at 80 / 90 / 95% sparsity (ERK), element
  granularity and 16×16 blocks (Evci et al. 2020);
* lottery tickets: IMP with rewinding (50% of the survivors per round) vs the
  same masks from a random re-initialisation, per round (Frankle & Carbin 2019);
* a supermask (edge-popup, 50% of the weights) on the frozen random network, vs
  that network untrained (Ramanujan et al. 2020).

Each record's ``median_ms`` is the median training-step time (its spread from the
steps of that run), ``extra`` holds the test accuracy and the sparsity reached.
Accuracies are from one seed: read differences under ~2 points as noise.  The
table is :func:`accuracy_table` (printed by the runner); the PNG is test accuracy
per method and setting.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from timm.models.vision_transformer import VisionTransformer

from harness import Progress, Record, Runner, TimedMs, spread_cell, spread_warning, timed_samples
from plot import NoPlot, pyplot
from sparsevit.sparse_training import (
    SET,
    LotteryTicket,
    RigL,
    StaticSparse,
    accuracy,
    convert_to_supermask,
    fit,
)

STEPS = 500
STEPS_QUICK = 150
BATCH = 64
LR = 2e-3


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images ``(N, 1, 8, 8)`` scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * x.shape[0])
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                             mlp_ratio=2.0, num_classes=10)


def _timed_fit(model, x, y, steps, on_step: Optional[Callable[[int], None]] = None, **kw) -> tuple[float, TimedMs]:
    """(final loss, median step time with its spread): each step is timed from one on_step to the next."""
    marks = [time.perf_counter()]

    def timed_step(t: int) -> None:
        marks.append(time.perf_counter())
        if on_step is not None:
            on_step(t)

    loss = fit(model, x, y, steps=steps, lr=LR, batch_size=BATCH, on_step=timed_step, **kw)
    if len(marks) < 2:  # no steps were run
        marks.append(time.perf_counter())
    return loss, timed_samples([(b - a) * 1e3 for a, b in zip(marks, marks[1:])])


def _add(runner: Runner, op: str, impl: str, shape: dict, ms: float, acc: float, sparsity: float, **extra) -> None:
    runner.add(Record("sparse_training", op, impl, None, "dense" if impl != "dense" else None, "float32", shape, ms,
                      extra={"accuracy": acc, "sparsity": sparsity, **extra}))


SPARSITIES, SPARSITIES_QUICK = (0.8, 0.9, 0.95), (0.9,)
GRANULARITIES = (("element", None), ("block", 16))
METHODS = {"static": StaticSparse, "SET": SET, "RigL": RigL}


def _rounds(runner: Runner) -> int:
    return 2 if runner.quick else 3


def run(runner: Runner) -> None:
    if runner.device.type != "cpu":
        print("sparse_training: the accuracy suite runs on the CPU")
    steps = STEPS_QUICK if runner.quick else STEPS
    data = digits()
    sparsities = SPARSITIES_QUICK if runner.quick else SPARSITIES
    rounds = _rounds(runner)
    # one line per trained model: dense + each DST point, the IMP rounds and their controls, the supermask
    bar = Progress(1 + len(sparsities) * len(GRANULARITIES) * len(METHODS) + (2 * rounds + 1) + 1, "sparse_training")
    threads = torch.get_num_threads()
    # Tiny models: one intra-op thread is faster than several, and robust on a shared CPU.
    torch.set_num_threads(1)
    try:
        _dynamic_sparse(runner, data, steps, sparsities, bar)
        _lottery(runner, data, steps, bar)
        _supermask(runner, data, steps, bar)
    finally:
        torch.set_num_threads(threads)


def _dynamic_sparse(runner: Runner, data, steps: int, sparsities, bar: Progress) -> None:
    xtr, ytr, xte, yte = data
    model = vit()
    _, ms = _timed_fit(model, xtr, ytr, steps)
    _add(runner, "dst_digits", "dense", {"sparsity": 0.0, "block": 1, "steps": steps}, ms, accuracy(model, xte, yte), 0.0)
    bar.advance("dense")
    methods = METHODS
    points = [(s, g, m) for s in sparsities for g in GRANULARITIES for m in methods]
    for s, (gran, block), name in points:
        model = vit()
        holder: dict = {}

        def attach(opt, name=name, s=s, gran=gran, block=block, model=model):
            holder["alg"] = methods[name](model, opt, s, delta_t=max(1, steps // 16), t_end=int(0.75 * steps),
                                          granularity=gran, block_size=block)

        _, ms = _timed_fit(model, xtr, ytr, steps, on_optimizer=attach, on_step=lambda t: holder["alg"].step())
        alg = holder["alg"]
        _add(runner, "dst_digits", name, {"sparsity": s, "block": block or 1, "steps": steps}, ms,
             accuracy(model, xte, yte), alg.manager.total_sparsity(), updates=len(alg.history))
        bar.advance(f"{name} sparsity {s} {gran}")


def _lottery(runner: Runner, data, steps: int, bar: Progress) -> None:
    xtr, ytr, xte, yte = data
    rounds = _rounds(runner)
    model = vit()
    ticket = LotteryTicket(model, 0.5, scope="global", rewind_step=max(1, steps // 20))
    for r in range(rounds + 1):
        _, ms = _timed_fit(model, xtr, ytr, steps, on_optimizer=ticket.attach, on_step=ticket.on_step)
        acc = accuracy(model, xte, yte)
        ticket.record(accuracy=acc)
        sp = ticket.manager.total_sparsity()
        _add(runner, "lottery_digits", "IMP-rewind", {"round": r, "steps": steps}, ms, acc, sp)
        bar.advance(f"IMP round {r}")
        if r > 0:
            # The control: the same mask, trained from fresh random weights.
            state = {k: v.clone() for k, v in model.state_dict().items()}
            ticket.random_reinit(seed=r)
            _, ms_c = _timed_fit(model, xtr, ytr, steps, on_optimizer=ticket.attach)
            _add(runner, "lottery_digits", "random-reinit", {"round": r, "steps": steps}, ms_c, accuracy(model, xte, yte), sp)
            bar.advance(f"IMP round {r} random re-init control")
            model.load_state_dict(state)
        if r < rounds:
            ticket.prune()
            ticket.rewind()


def _supermask(runner: Runner, data, steps: int, bar: Progress) -> None:
    xtr, ytr, xte, yte = data
    model = convert_to_supermask(vit(), 0.5, seed=0)
    untrained = accuracy(model, xte, yte)
    _add(runner, "supermask_digits", "random-untrained", {"sparsity": 0.5, "steps": 0}, 0.0, untrained, 0.5)
    _, ms = _timed_fit(model, xtr, ytr, steps)
    _add(runner, "supermask_digits", "edge-popup", {"sparsity": 0.5, "steps": steps}, ms, accuracy(model, xte, yte), 0.5)
    bar.advance("supermask")


def accuracy_table(records: list[Record]) -> str:
    """A markdown table: method, setting, test accuracy, sparsity, median ms/step and its spread."""
    lines = ["| experiment | method | setting | test acc. | sparsity | ms/step | IQR |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        setting = ", ".join(f"{k}={v}" for k, v in r.shape.items())
        lines.append(f"| {r.op} | {r.impl} | {setting} | {100 * r.extra['accuracy']:.1f}% | "
                     f"{100 * r.extra['sparsity']:.1f}% | {r.median_ms:.1f} | {spread_cell(r)} |")
    warning = spread_warning(records)
    return "\n".join(lines + ([warning] if warning else []))


format_records = accuracy_table  # the table benchmarks/run.py prints for this suite


def plot(result: dict, path: str) -> str:
    """Test accuracy per method and setting (horizontal bars), one colour per experiment."""
    records = [r for r in result["records"] if "accuracy" in r.get("extra", {})]
    if not records:
        raise NoPlot("no record has an accuracy")
    plt = pyplot()
    labels = [f"{r['op']}: {r['impl']} " + ", ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "steps")
              for r in records]
    ops = sorted({r["op"] for r in records})
    colours = {op: f"C{i}" for i, op in enumerate(ops)}
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.25 * len(records)))
    ys = list(range(len(records)))[::-1]
    ax.barh(ys, [100 * r["extra"]["accuracy"] for r in records], color=[colours[r["op"]] for r in records])
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel("test accuracy (%)")
    env = result["environment"]
    ax.set_title(f"sparse_training on {env['device_name']} (torch {env['torch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
