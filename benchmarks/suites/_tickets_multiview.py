"""Part ``multiview``: ensembles, knowledge distillation and self-distillation on multi-view data
(Allen-Zhu & Li, ICLR 2023).

Data: :func:`sparsevit.datasets.multi_view_splits`, 10 classes with 2 views each, 16×16
one-channel images of 4×4 patches of 4×4 pixels, 20% single-view samples, Gaussian noise and
weak features of other classes on 3 distractor patches (the class patterns are fixed, the
samples are drawn from ``seed``).  Model: a small timm ``VisionTransformer`` (patch 4 → 16
tokens, embed 64, depth 2, 4 heads, MLP 128, like :func:`suites.sparse_training.vit`), AdamW at
a constant rate on mini-batches, every model with its own initialisation and batch order.

* ``single``: 5 independently seeded models trained on the labels (mean test top1, and its spread);
* ``ensemble``: their mean logits (:func:`sparsevit.models.losses.ensemble_logits`);
* ``distilled``: one new student distilled from the ensemble,
  ``(1 − α)·CE(y, labels) + α·T²·KL(softmax(y_ens/T) ‖ softmax(y/T))``
  (:class:`~sparsevit.models.losses.DistillationLoss`, soft targets), teacher logits on the
  training images computed once;
* ``self-distilled``: a new student distilled the same way from ONE single model (the first).

Every row splits the test top1 into the multi-view and the single-view test samples: in
the paper each single model learns only some of the views of a class and fails the
single-view samples showing another, the ensemble covers more views, and distillation
transfers them to one model.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sparsevit.datasets import MultiViewDataset, multi_view_splits
from sparsevit.models.losses import DistillationLoss, ensemble_logits

MODELS = 5
STEPS, STEPS_QUICK = 500, 120
N_TRAIN, N_TEST = 2000, 1000
N_TRAIN_QUICK, N_TEST_QUICK = 1000, 500
BATCH = 64
LR = 2e-3
ALPHA, TEMPERATURE = 0.5, 2.0
DATA = dict(num_classes=10, views=2, single_view_fraction=0.2, patch=4, grid=4, amplitude=1.0, noise=0.8,
            distractor=0.5, num_distractors=3, pattern_seed=0)


def mv_vit(seed: int) -> nn.Module:
    """The small ViT of :func:`suites.sparse_training.vit` on 16×16 one-channel images, patch 4."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=DATA["patch"] * DATA["grid"], patch_size=DATA["patch"], in_chans=1, embed_dim=64, depth=2,
                             num_heads=4, mlp_ratio=2.0, num_classes=DATA["num_classes"])


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, seed: int, loss_fn: DistillationLoss,
           teacher: Optional[torch.Tensor] = None) -> float:
    """Mini-batch AdamW on ``loss_fn(model(x_b), y_b, teacher_b)`` (reshuffled each epoch); returns the seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + BATCH > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + BATCH]
        pos += BATCH
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx], None if teacher is None else teacher[idx])
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def _logits(models: list[nn.Module], x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([ensemble_logits(models, x[i:i + batch]) for i in range(0, x.shape[0], batch)])


def _scores(logits: torch.Tensor, test: MultiViewDataset) -> dict:
    correct = logits.argmax(-1) == test.labels
    single = test.single_view

    def rate(mask: torch.Tensor) -> float:
        return int(correct[mask].sum()) / max(1, int(mask.sum()))

    return {"top1": rate(torch.ones_like(single)), "top1_single_view": rate(single), "top1_multi_view": rate(~single)}


def _rows(seed: int, quick: bool) -> list[dict]:
    steps = STEPS_QUICK if quick else STEPS
    n_train, n_test = (N_TRAIN_QUICK, N_TEST_QUICK) if quick else (N_TRAIN, N_TEST)
    train, test = multi_view_splits(n_train, n_test, seed=seed, **DATA)
    x, y = train.images, train.labels
    data = {"classes": DATA["num_classes"], "views": DATA["views"], "single_view_fraction": DATA["single_view_fraction"],
            "noise": DATA["noise"], "distractors": f"{DATA['distractor']}x{DATA['num_distractors']}",
            "n_train": n_train, "n_test": n_test, "steps": steps}
    base = 100 * seed
    ce = DistillationLoss(mode="none")
    models, times, singles = [], [], []
    for i in range(MODELS):
        model = mv_vit(base + i)
        times.append(_train(model, x, y, steps=steps, seed=base + i, loss_fn=ce))
        models.append(model)
        singles.append(_scores(_logits([model], test.images), test))
    mean = {k: sum(s[k] for s in singles) / MODELS for k in singles[0]}
    top1s = torch.tensor([s["top1"] for s in singles], dtype=torch.float64)
    common = {"experiment": "multiview", "sparsity": 0.0}
    rows = [{**common, "method": "single", "setting": {**data, "models": f"mean of {MODELS}"}, **mean,
             "train_s": sum(times) / MODELS, "top1_std": float(top1s.std()), "top1_min": float(top1s.min()),
             "top1_max": float(top1s.max()), "top1_models": top1s.tolist()}]
    rows.append({**common, "method": "ensemble", "setting": {**data, "models": f"mean logits of {MODELS}"},
                 **_scores(_logits(models, test.images), test), "train_s": sum(times)})
    kd = DistillationLoss(mode="soft", alpha=ALPHA, temperature=TEMPERATURE)
    for method, teachers, student_seed in (("distilled", models, base + MODELS), ("self-distilled", models[:1], base + MODELS + 1)):
        t0 = time.perf_counter()
        teacher = _logits(teachers, x)
        teacher_s = time.perf_counter() - t0
        student = mv_vit(student_seed)
        student_s = _train(student, x, y, steps=steps, seed=student_seed, loss_fn=kd, teacher=teacher)
        source = f"ensemble of {MODELS}" if len(teachers) > 1 else "single model 0"
        rows.append({**common, "method": method,
                     "setting": {**data, "teacher": source, "alpha": ALPHA, "temperature": TEMPERATURE},
                     **_scores(_logits([student], test.images), test), "train_s": teacher_s + student_s})
    return rows


def experiment(seed: int, quick: bool) -> list[dict]:
    """Rows ``single`` (mean of the 5 models, with the spread), ``ensemble``, ``distilled``, ``self-distilled``;
    each with test top1 overall and on the single- and multi-view test samples.  Deterministic per seed.

    ``train_s``: seconds per single model; the 5 together for the ensemble; the student's training
    plus its teacher logits for the distilled ones (the teachers' own training excluded).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return _rows(seed, bool(quick))  # suites.tickets pins one intra-op thread around every part
