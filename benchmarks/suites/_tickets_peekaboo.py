"""Part ``peekaboo`` of the ``tickets`` suite: Peek-a-Boo vs edge-popup (Chen et al., ICLR 2022).

Both methods use the model of :func:`suites.sparse_training.vit` (seeded alike) on the digits
of :func:`suites.sparse_training.digits`, and neither changes a weight's magnitude:

* ``peekaboo-{magnitude,snip,synflow}``: :class:`~sparsevit.sparse_training.PeekABoo`: prune at
  initialisation (global scope; SNIP on 256 training images; SynFlow with its 100 rounds),
  then learn only the kept weights' signs with Bop (``γ = 1e-3``, ``τ = 1e-5``);
* ``edge-popup``: :func:`~sparsevit.sparse_training.convert_to_supermask`: learn which weights to
  keep (per-layer top-k of scores trained by AdamW) on frozen signed-constant weights
  ``±sqrt(2 / fan_in)`` (its own initialisation, as in Ramanujan et al.).

Same layers in both (every Linear but the head; stem, head, norms and embeddings stay frozen
and random), same sparsity, same steps and batches.  For Peek-a-Boo the sparsified weights are
re-drawn ``N(0, 2 / fan_in)`` (Kaiming normal, the scale of the paper's networks; edge-popup's
constant has the same scale): at timm's ``std = 0.02`` the body has too little leverage for
signs alone, which the ``peekaboo-magnitude@timm-init`` row shows.  ``train_s`` is the wall
time of stage 1 plus training (one thread); ``prune_s`` is stage 1 alone.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from sparsevit.sparse_training import PeekABoo, accuracy, convert_to_supermask, fit, ticket_sparsity
from suites.sparse_training import BATCH, LR, STEPS, digits, vit

SPARSITIES, SPARSITIES_QUICK = (0.5, 0.8), (0.5,)
STEPS_QUICK = 150
GAMMA, TAU = 1e-3, 1e-5
SCORES, SCORES_QUICK = ("magnitude", "snip", "synflow"), ("magnitude", "snip")
SNIP_IMAGES = 256


def kaiming_body(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every non-head Linear weight ``~ N(0, 2 / fan_in)`` from ``seed`` (in place); returns ``model``."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "head" not in name.split("."):
                module.weight.normal_(0.0, (2.0 / module.weight.shape[1]) ** 0.5, generator=g)
    return model


def _peekaboo(seed: int, sparsity: float, score: str, steps: int, data, kaiming: bool = True) -> dict:
    xtr, ytr, xte, yte = data
    model = kaiming_body(vit(seed), seed) if kaiming else vit(seed)
    t0 = time.perf_counter()
    pab = PeekABoo(model, sparsity, score=score, data=(xtr[:SNIP_IMAGES], ytr[:SNIP_IMAGES]), gamma=GAMMA, tau=TAU)
    pab.fit(xtr, ytr, steps=steps, batch_size=BATCH, seed=seed)
    train_s = time.perf_counter() - t0
    unchanged = all(torch.equal(l.weight.detach().abs(), pab.magnitudes[n]) for n, l in pab.manager.layers.items())
    if not unchanged:
        raise RuntimeError("Peek-a-Boo changed a weight's magnitude")
    method = f"peekaboo-{score}" + ("" if kaiming else "@timm-init")
    return {"experiment": "peekaboo", "method": method,
            "setting": {"sparsity": sparsity, "steps": steps, "gamma": GAMMA, "tau": TAU},
            "top1": accuracy(model, xte, yte), "sparsity": pab.sparsity(), "train_s": train_s,
            "prune_s": pab.prune_s, "flipped_fraction": pab.flipped_fraction(), "flips": pab.total_flips}


def _edge_popup(seed: int, sparsity: float, steps: int, data) -> dict:
    xtr, ytr, xte, yte = data
    t0 = time.perf_counter()
    model = convert_to_supermask(vit(seed), sparsity, seed=seed)
    fit(model, xtr, ytr, steps=steps, lr=LR, batch_size=BATCH, seed=seed)
    train_s = time.perf_counter() - t0
    return {"experiment": "peekaboo", "method": "edge-popup",
            "setting": {"sparsity": sparsity, "steps": steps, "lr": LR},
            "top1": accuracy(model, xte, yte), "sparsity": ticket_sparsity(model), "train_s": train_s,
            "prune_s": 0.0}


def experiment(seed: int, quick: bool) -> list[dict]:
    """Rows ``{"experiment": "peekaboo", "method", "setting", "top1", "sparsity", "train_s", ...}``
    for Peek-a-Boo (each score) and edge-popup at each sparsity.  Deterministic per seed."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    steps = STEPS_QUICK if quick else STEPS
    data = digits()
    rows: list[dict] = []
    for sparsity in SPARSITIES_QUICK if quick else SPARSITIES:
        rows.append(_edge_popup(seed, sparsity, steps, data))
        for score in SCORES_QUICK if quick else SCORES:
            rows.append(_peekaboo(seed, sparsity, score, steps, data))
    rows.append(_peekaboo(seed, SPARSITIES[0], "magnitude", steps, data, kaiming=False))
    return rows
