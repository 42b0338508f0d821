"""Part ``rst`` of the ``tickets`` suite: Dual LTH / RST (Bai et al., ICLR 2022) vs training the same
random mask directly.

Data and model: :func:`suites.sparse_training.digits` and :func:`suites.sparse_training.vit`,
AdamW at ``LR``, ``STEPS`` mini-batches of ``BATCH`` for every model (the same budget):

* ``dense``: the dense network;
* ``random-static``: :class:`~sparsevit.sparse_training.StaticSparse`, a random ERK mask
  applied at step 0 and trained;
* ``rst``: :class:`~sparsevit.sparse_training.RandomSparseTransformation` with **the same
  mask** (same seed and allocation; the part checks it): ``PENALTY_STEPS`` dense steps with
  ``λ_t = min(λ_max, η·t)`` on the weights outside it, then removal and sparse training for
  the remaining steps.  ``penalised_norm_ratio`` is ``‖W⊙(1−M)‖`` just before removal over
  its value at initialisation.
"""

from __future__ import annotations

import time

from sparsevit.sparse_training import RandomSparseTransformation, StaticSparse, accuracy, fit
from suites.sparse_training import BATCH, LR, STEPS, digits, vit

SPARSITIES, SPARSITIES_QUICK = (0.9, 0.98), (0.9,)
STEPS_QUICK = 150
DISTRIBUTION = "erk"
PENALTY_FRACTION = 0.2  # of the steps: the dense penalty phase
LAMBDA_STEP, LAMBDA_EVERY, LAMBDA_MAX = 1e-2, 1, 1.0


def _row(method: str, setting: dict, top1: float, sparsity: float, train_s: float, **extra) -> dict:
    return {"experiment": "rst", "method": method, "setting": setting, "top1": top1, "sparsity": sparsity,
            "train_s": train_s, **extra}


def _static(seed: int, sparsity: float, steps: int, data) -> tuple[dict, dict]:
    xtr, ytr, xte, yte = data
    model, holder = vit(seed), {}
    t0 = time.perf_counter()
    fit(model, xtr, ytr, steps=steps, lr=LR, batch_size=BATCH, seed=seed,
        on_optimizer=lambda opt: holder.update(alg=StaticSparse(model, opt, sparsity, distribution=DISTRIBUTION,
                                                                seed=seed)),
        on_step=lambda t: holder["alg"].step())
    train_s = time.perf_counter() - t0
    manager = holder["alg"].manager
    row = _row("random-static", {"sparsity": sparsity, "steps": steps, "distribution": DISTRIBUTION},
               accuracy(model, xte, yte), manager.total_sparsity(), train_s)
    return row, manager.masks()


def _rst(seed: int, sparsity: float, steps: int, data, static_masks: dict) -> dict:
    xtr, ytr, xte, yte = data
    model = vit(seed)
    penalty_steps = max(1, int(PENALTY_FRACTION * steps))
    t0 = time.perf_counter()
    rst = RandomSparseTransformation(model, sparsity, distribution=DISTRIBUTION, seed=seed, lambda_step=LAMBDA_STEP,
                                     lambda_every=LAMBDA_EVERY, lambda_max=LAMBDA_MAX, penalty_steps=penalty_steps)
    if any(not (rst.masks()[n] == m).all() for n, m in static_masks.items()):
        raise RuntimeError("RST drew another random mask than StaticSparse for the same seed")
    start, before = rst.penalised_norm(), {}

    def on_step(t: int) -> None:
        if t == penalty_steps:
            before["norm"] = rst.penalised_norm()
        rst.step()

    fit(model, xtr, ytr, steps=steps, lr=LR, batch_size=BATCH, seed=seed, on_optimizer=rst.attach, on_step=on_step)
    train_s = time.perf_counter() - t0
    setting = {"sparsity": sparsity, "steps": steps, "distribution": DISTRIBUTION, "penalty_steps": penalty_steps,
               "lambda_step": LAMBDA_STEP, "lambda_every": LAMBDA_EVERY, "lambda_max": LAMBDA_MAX}
    return _row("rst", setting, accuracy(model, xte, yte), rst.manager.total_sparsity(), train_s,
                penalised_norm_ratio=before["norm"] / start)


def experiment(seed: int, quick: bool) -> list[dict]:
    """Rows ``{"experiment": "rst", "method", "setting", "top1", "sparsity", "train_s", ...}``: dense, then per
    sparsity the random static mask and RST with the same mask.  Deterministic per seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    steps = STEPS_QUICK if quick else STEPS
    data = digits()
    xtr, ytr, xte, yte = data
    model = vit(seed)
    t0 = time.perf_counter()
    fit(model, xtr, ytr, steps=steps, lr=LR, batch_size=BATCH, seed=seed)
    rows = [_row("dense", {"sparsity": 0.0, "steps": steps}, accuracy(model, xte, yte), 0.0,
                 time.perf_counter() - t0)]
    for sparsity in SPARSITIES_QUICK if quick else SPARSITIES:
        row, masks = _static(seed, sparsity, steps, data)
        rows += [row, _rst(seed, sparsity, steps, data, masks)]
    return rows
