"""Part ``universal`` of the ``tickets`` suite: universal lottery tickets (Burkholz et al., ICLR 2022).

A ticket is found on the source task (digit identity on scikit-learn's 8×8 digits, the
fixed split of :func:`suites.sparse_training.digits`, model :func:`suites.sparse_training.vit`):

* ``supermask``: edge-popup at 50% sparsity on the frozen random network (only scores train);
* ``imp``: IMP with rewinding, 2 trainings (dense, then the 50%-pruned network rewound to
  ``θ_k``), the trained sparse network being the ticket.

Then the ticket is frozen and, for each target task of :mod:`sparsevit.datasets.digit_tasks`,
only a new linear head ``y_t = A_t · φ(x) + b_t`` is trained (one
:class:`~sparsevit.sparse_training.UniversalTicket` with a head per task).  Baselines, with
the same heads and training: a linear probe on the untrained dense random network
(``dense-random``) and on the dense network trained on the source task (``dense-source``,
IMP's first training).  ``universal_source`` rows give each backbone's top1 on the source
task with its own head.  Test tasks are drawn from the test split with their own seed
(other shifts and noise than the training tasks).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sparsevit.datasets import digit_task
from sparsevit.sparse_training import LotteryTicket, UniversalTicket, accuracy, convert_to_supermask, fit, ticket_sparsity
from suites.sparse_training import BATCH, LR, STEPS, digits, vit

SPARSITY = 0.5
STEPS_QUICK = 100
HEAD_STEPS, HEAD_STEPS_QUICK = 250, 60
HEAD_LR = 1e-2
TARGETS = ("parity", "at_least_5", "shifted_identity")
TARGETS_QUICK = ("parity", "shifted_identity")


def _source_tickets(seed: int, steps: int, data) -> list[tuple[str, nn.Module, float, float]]:
    """``(method, backbone, sparsity, source training seconds)`` for the four backbones."""
    xtr, ytr, _, _ = data
    out: list[tuple[str, nn.Module, float, float]] = [("dense-random", vit(seed), 0.0, 0.0)]
    model = vit(seed)
    ticket = LotteryTicket(model, SPARSITY, scope="global", rewind_step=max(1, steps // 20))
    t0 = time.perf_counter()
    fit(model, xtr, ytr, steps=steps, lr=LR, batch_size=BATCH, seed=seed, on_optimizer=ticket.attach,
        on_step=ticket.on_step)
    dense_s = time.perf_counter() - t0
    dense = vit(seed)
    dense.load_state_dict(model.state_dict())
    out.append(("dense-source", dense, 0.0, dense_s))
    ticket.prune()
    ticket.rewind()
    t0 = time.perf_counter()
    fit(model, xtr, ytr, steps=steps, lr=LR, batch_size=BATCH, seed=seed, on_optimizer=ticket.attach)
    ticket.manager.apply_masks()
    out.append(("imp", model, ticket.manager.total_sparsity(), dense_s + time.perf_counter() - t0))
    ticket.manager.remove()  # the ticket is found: no hook of the source training stays on its weights
    sm = convert_to_supermask(vit(seed), SPARSITY, seed=seed)
    t0 = time.perf_counter()
    fit(sm, xtr, ytr, steps=steps, lr=LR, batch_size=BATCH, seed=seed)
    out.append(("supermask", sm, ticket_sparsity(sm), time.perf_counter() - t0))
    return out


def _rows(seed: int, quick: bool) -> list[dict]:
    steps = STEPS_QUICK if quick else STEPS
    head_steps = HEAD_STEPS_QUICK if quick else HEAD_STEPS
    targets = TARGETS_QUICK if quick else TARGETS
    data = digits()
    xtr, ytr, xte, yte = data
    tasks = {name: (digit_task(name, xtr, ytr, seed=seed), digit_task(name, xte, yte, seed=seed + 10_000))
             for name in targets}
    rows: list[dict] = []
    for method, backbone, sparsity, source_s in _source_tickets(seed, steps, data):
        rows.append({"experiment": "universal_source", "method": method,
                     "setting": {"task": "identity", "source_steps": steps if source_s else 0},
                     "top1": accuracy(backbone, xte, yte), "sparsity": sparsity, "train_s": source_s})
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        universal = UniversalTicket(backbone, seed=seed)
        for name, (train, test) in tasks.items():
            universal.add_task(name, train.num_classes)
            t0 = time.perf_counter()
            fit(universal.select_task(name), train.images, train.labels, steps=head_steps, lr=HEAD_LR,
                batch_size=BATCH, seed=seed)
            head_s = time.perf_counter() - t0
            majority = float(torch.bincount(test.labels).max()) / len(test)
            rows.append({"experiment": "universal_tickets", "method": method,
                         "setting": {"target": name, "head_steps": head_steps, "source_steps": steps},
                         "top1": accuracy(universal, test.images, test.labels), "sparsity": sparsity,
                         "train_s": head_s, "source_train_s": source_s, "num_classes": train.num_classes,
                         "majority_top1": majority})
        unchanged = all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
        if not unchanged:
            raise RuntimeError(f"training the heads changed the frozen {method} ticket")
    return rows


def experiment(seed: int, quick: bool) -> list[dict]:
    """One dict per evaluated model: the source-task top1 of each backbone, then the top1 of a new linear
    head per (backbone, target task) on the frozen backbone.  Deterministic per seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return _rows(seed, bool(quick))  # suites.tickets pins one intra-op thread around every part
