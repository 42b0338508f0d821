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

Each record's ``median_ms`` is the mean training-step time, ``extra`` holds the
test accuracy and the sparsity reached.  Accuracies are from one seed: read
differences under ~2 points as noise.
"""

from __future__ import annotations

import time

import torch
from timm.models.vision_transformer import VisionTransformer

from harness import Record, Runner, progress
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


def _timed_fit(model, x, y, steps, **kw) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = fit(model, x, y, steps=steps, lr=LR, batch_size=BATCH, **kw)
    return loss, (time.perf_counter() - t0) * 1e3 / max(1, steps)


def _add(runner: Runner, op: str, impl: str, shape: dict, ms: float, acc: float, sparsity: float, **extra) -> None:
    runner.add(Record("sparse_training", op, impl, None, "dense" if impl != "dense" else None, "float32", shape, ms,
                      extra={"accuracy": acc, "sparsity": sparsity, **extra}))


def run(runner: Runner) -> None:
    if runner.device.type != "cpu":
        print("sparse_training: the accuracy suite runs on the CPU")
    steps = STEPS_QUICK if runner.quick else STEPS
    data = digits()
    threads = torch.get_num_threads()
    # Tiny models: one intra-op thread is faster than several, and robust on a shared CPU.
    torch.set_num_threads(1)
    try:
        _dynamic_sparse(runner, data, steps)
        _lottery(runner, data, steps)
        _supermask(runner, data, steps)
    finally:
        torch.set_num_threads(threads)
    print(accuracy_table(runner.records))


def _dynamic_sparse(runner: Runner, data, steps: int) -> None:
    xtr, ytr, xte, yte = data
    model = vit()
    _, ms = _timed_fit(model, xtr, ytr, steps)
    _add(runner, "dst_digits", "dense", {"sparsity": 0.0, "block": 1, "steps": steps}, ms, accuracy(model, xte, yte), 0.0)
    sparsities = [0.9] if runner.quick else [0.8, 0.9, 0.95]
    grans = [("element", None), ("block", 16)]
    methods = {"static": StaticSparse, "SET": SET, "RigL": RigL}
    points = [(s, g, m) for s in sparsities for g in grans for m in methods]
    for s, (gran, block), name in progress(points, "dst"):
        model = vit()
        holder: dict = {}

        def attach(opt, name=name, s=s, gran=gran, block=block, model=model):
            holder["alg"] = methods[name](model, opt, s, delta_t=max(1, steps // 16), t_end=int(0.75 * steps),
                                          granularity=gran, block_size=block)

        _, ms = _timed_fit(model, xtr, ytr, steps, on_optimizer=attach, on_step=lambda t: holder["alg"].step())
        alg = holder["alg"]
        _add(runner, "dst_digits", name, {"sparsity": s, "block": block or 1, "steps": steps}, ms,
             accuracy(model, xte, yte), alg.manager.total_sparsity(), updates=len(alg.history))


def _lottery(runner: Runner, data, steps: int) -> None:
    xtr, ytr, xte, yte = data
    rounds = 2 if runner.quick else 3
    model = vit()
    ticket = LotteryTicket(model, 0.5, scope="global", rewind_step=max(1, steps // 20))
    for r in range(rounds + 1):
        _, ms = _timed_fit(model, xtr, ytr, steps, on_optimizer=ticket.attach, on_step=ticket.on_step)
        acc = accuracy(model, xte, yte)
        ticket.record(accuracy=acc)
        sp = ticket.manager.total_sparsity()
        _add(runner, "lottery_digits", "IMP-rewind", {"round": r, "steps": steps}, ms, acc, sp)
        if r > 0:
            # The control: the same mask, trained from fresh random weights.
            state = {k: v.clone() for k, v in model.state_dict().items()}
            ticket.random_reinit(seed=r)
            _, ms_c = _timed_fit(model, xtr, ytr, steps, on_optimizer=ticket.attach)
            _add(runner, "lottery_digits", "random-reinit", {"round": r, "steps": steps}, ms_c, accuracy(model, xte, yte), sp)
            model.load_state_dict(state)
        if r < rounds:
            ticket.prune()
            ticket.rewind()


def _supermask(runner: Runner, data, steps: int) -> None:
    xtr, ytr, xte, yte = data
    model = convert_to_supermask(vit(), 0.5, seed=0)
    untrained = accuracy(model, xte, yte)
    _add(runner, "supermask_digits", "random-untrained", {"sparsity": 0.5, "steps": 0}, 0.0, untrained, 0.5)
    _, ms = _timed_fit(model, xtr, ytr, steps)
    _add(runner, "supermask_digits", "edge-popup", {"sparsity": 0.5, "steps": steps}, ms, accuracy(model, xte, yte), 0.5)


def accuracy_table(records: list[Record]) -> str:
    """A markdown table: method, setting, test accuracy, sparsity, ms/step."""
    lines = ["| experiment | method | setting | test acc. | sparsity | ms/step |", "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        setting = ", ".join(f"{k}={v}" for k, v in r.shape.items())
        lines.append(f"| {r.op} | {r.impl} | {setting} | {100 * r.extra['accuracy']:.1f}% | "
                     f"{100 * r.extra['sparsity']:.1f}% | {r.median_ms:.1f} |")
    return "\n".join(lines)
