"""Suite ``digits``: accuracy and speed of token-sparse ViTs on two digit tasks (CPU-sized).

Two variants of one generator, each its own set of records (``shape["variant"]``):

* ``scattered``: scikit-learn's 8×8 digits, upscaled and placed on the patch grid of a
  larger noisy canvas (:mod:`sparsevit.datasets.scattered_digits`), so most patches
  are background;
* ``cluttered``: the harder held-out variant (:mod:`sparsevit.datasets.cluttered_digits`):
  the same canvas with fragments of *other* digits beside the labelled one, and train
  and test splits drawn from disjoint digits.

On each, a small timm ViT (its class token as the pooled feature) is trained from scratch; then, from it:

* DynamicViT at ρ = 0.7 and 0.5, fine-tuned with the dense model as teacher
  (DynamicViTLoss: CE + λ_ratio·ratio + 0.5·KL + 0.5·token MSE; predictors at lr 1e-3
  on detached tokens, backbone at 1e-4), evaluated with real token dropping;
* a data-level patch ticket (Shen et al. 2023): the dense model's class-token attention
  picks k patches per image; a ViT from the *same initialisation* is trained on only
  those patches, against the same ViT trained on k random patches; both evaluated
  "sparse" (test images reduced the same way) and "dense" (all patches).

Each record: top-1 on the test split, tokens per block, analytic FLOPs per image and
the measured inference time of a batch (img/s), with the ratio to the dense model.
Seeds are fixed; ``--quick`` uses a smaller canvas, model and schedule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from sparsevit.datasets import cluttered_digits_splits, scattered_digits_splits
from sparsevit.models import DynamicViT, DynamicViTLoss, PatchTicketViT, RandomPatchSelector, TicketSelector
from sparsevit.models.train_loop import evaluate, train
from timm.models.vision_transformer import VisionTransformer

from harness import Progress, Record, Runner, time_ms
from plot import NoPlot, pyplot


@dataclass(frozen=True)
class Config:
    canvas: int
    scale: int
    patch: int
    embed_dim: int
    depth: int
    heads: int
    epochs: int
    finetune_epochs: int
    ticket_keep: float
    seeds: tuple
    ratio_weight: float = 2.0
    clutter: int = 2
    variants: tuple = ("scattered", "cluttered")


QUICK = Config(canvas=32, scale=1, patch=8, embed_dim=48, depth=4, heads=3, epochs=3, finetune_epochs=1, ticket_keep=0.25, seeds=(0,))
FULL = Config(canvas=40, scale=2, patch=8, embed_dim=48, depth=4, heads=3, epochs=30, finetune_epochs=10, ticket_keep=0.25, seeds=(0, 1, 2))
NOISE = 0.2


def splits(cfg: Config, variant: str, seed: int):
    """Train and test splits of ``variant`` (digits on the patch grid in both)."""
    if variant == "scattered":
        return scattered_digits_splits(canvas=cfg.canvas, scale=cfg.scale, noise=NOISE, seed=seed, align=cfg.patch)
    if variant == "cluttered":
        return cluttered_digits_splits(canvas=cfg.canvas, scale=cfg.scale, noise=NOISE, clutter=cfg.clutter,
                                       fragment=4, seed=seed, align=cfg.patch)
    raise ValueError(f"variant must be 'scattered' or 'cluttered', got {variant!r}")
BATCH = 64
EVAL_BATCH = 256


def vit_flops(embed_dim: int, tokens_per_block: list[int], mlp_ratio: float = 4.0) -> int:
    """FLOPs of the blocks: per block 2·(4nC² + 2·mlp·nC² + 2n²C) (qkv+proj, MLP, QKᵀ and ÃV)."""
    c = embed_dim
    return int(sum(2 * (4 * n * c * c + 2 * mlp_ratio * n * c * c + 2 * n * n * c) for n in tokens_per_block))


def _vit(cfg: Config, seed: int) -> VisionTransformer:
    """The suite's ViT.  The class token is the pooled feature: with average pooling the
    feature is the mean of every patch token, so dropping tokens shifts it away from what
    the head was trained on (see the README's DynamicViT diagnosis)."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=cfg.canvas, patch_size=cfg.patch, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.heads, num_classes=10, global_pool="token")


def _throughput(runner: Runner, predict, images: torch.Tensor) -> float:
    with torch.no_grad():
        return time_ms(lambda: predict(images), runner.device, min_time_s=0.5)


def run(runner: Runner) -> None:
    cfg = QUICK if runner.quick else FULL
    # One progress line per trained model (dense, two DynamicViTs, ticket, random), variant and seed.
    bar = Progress(5 * len(cfg.seeds) * len(cfg.variants), "digits")
    for variant in cfg.variants:
        for seed in cfg.seeds:
            run_seed(runner, cfg, variant, seed, bar)


def run_seed(runner: Runner, cfg: Config, variant: str, seed: int, bar: Progress) -> None:
    """Train and record every model of one variant and seed."""
    n_patch = (cfg.canvas // cfg.patch) ** 2
    train_set, test_set = splits(cfg, variant, seed)
    batch = test_set.images[:EVAL_BATCH].to(runner.device)
    shape = {"variant": variant, "canvas": cfg.canvas, "patch": cfg.patch, "C": cfg.embed_dim, "depth": cfg.depth, "seed": seed}
    tag = f"{variant} seed {seed}"

    def record(op: str, model_acc: float, ms: float, tokens: list[int], base_ms: float | None, extra: dict) -> None:
        runner.add(Record("digits", op, op, None, None if base_ms is None else "dense", "float32", shape, ms,
                          flops=vit_flops(cfg.embed_dim, tokens), speedup_vs_baseline=None if base_ms is None else base_ms / ms,
                          extra={"top1": model_acc, "tokens_per_block": tokens, "img_per_s": EVAL_BATCH / (ms * 1e-3), **extra}))

    # Dense baseline.
    init = _vit(cfg, seed)
    dense = copy.deepcopy(init).to(runner.device)
    train(dense, lambda e: train_set.batches(BATCH, shuffle=True, seed=100 * seed + e), cfg.epochs, lr=2e-3)
    dense.eval()
    acc = evaluate(dense, test_set.batches(EVAL_BATCH))
    dense_ms = _throughput(runner, dense, batch)
    record("dense", acc, dense_ms, [n_patch + 1] * cfg.depth, None, {"epochs": cfg.epochs})
    bar.advance(f"{tag}: dense ViT trained")

    # DynamicViT fine-tuned from the dense model, dense teacher.
    for rho in (0.7, 0.5):
        model = DynamicViT(copy.deepcopy(dense), keep_ratio=rho, detach_predictor_input=True)
        loss_fn = DynamicViTLoss(ratio_weight=cfg.ratio_weight)

        def step(m, images, labels, loss_fn=loss_fn):
            with torch.no_grad():
                teacher, teacher_tokens = dense(images), dense.forward_features(images)
            return loss_fn(m(images), labels, teacher_logits=teacher, teacher_tokens=teacher_tokens)

        # Predictors at 1e-3, the backbone at 1e-4, logit and token distillation from the dense
        # model, predictors on detached tokens (see the README's DynamicViT diagnosis).
        train(model, lambda e: train_set.batches(BATCH, shuffle=True, seed=7 + e), cfg.finetune_epochs, lr=1e-3,
              step_fn=step, lr_for=lambda name: 1e-3 if name.startswith("score_predictor") else 1e-4)
        model.eval()
        acc = evaluate(model, test_set.batches(EVAL_BATCH))
        with torch.no_grad():
            _, kept = model(batch[:1], return_index=True)
        tokens, current = [], n_patch + 1
        for i in range(cfg.depth):
            if i in model.prune_at:
                current = kept[model.prune_at.index(i)].shape[1]
            tokens.append(current)
        ms = _throughput(runner, model, batch)
        record(f"dynamicvit rho={rho}", acc, ms, tokens, dense_ms, {"prune_at": model.prune_at, "finetune_epochs": cfg.finetune_epochs})
        bar.advance(f"{tag}: DynamicViT rho={rho} fine-tuned")

    # Patch ticket vs random patches, trained from the same initialisation.
    selector = TicketSelector(copy.deepcopy(dense), depths=list(range(1, cfg.depth)), keep=cfg.ticket_keep)
    k = max(1, round(cfg.ticket_keep * n_patch))
    for name, pick in (("ticket", selector), ("random", RandomPatchSelector(n_patch, k, seed=seed))):
        train_index = torch.cat([pick(images) for images, _ in train_set.batches(EVAL_BATCH)])
        student = PatchTicketViT(copy.deepcopy(init).to(runner.device))

        def batches(e, train_index=train_index):
            order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(100 * seed + e))
            for s in range(0, len(train_set), BATCH):
                idx = order[s:s + BATCH]
                yield (train_set.images[idx], train_index[idx]), train_set.labels[idx]

        def step(m, inputs, labels):
            images, index = inputs
            return torch.nn.functional.cross_entropy(m(images, index), labels)

        train(student, batches, cfg.epochs, lr=2e-3, step_fn=step)
        student.eval()
        sparse_acc = evaluate(lambda images: student(images, pick(images)), test_set.batches(EVAL_BATCH))
        dense_acc = evaluate(lambda images: student(images), test_set.batches(EVAL_BATCH))
        index = pick(batch)
        ms = _throughput(runner, lambda images: student(images, index), batch)
        record(f"{name} patches k={k} (sparse eval)", sparse_acc, ms, [k + 1] * cfg.depth, dense_ms, {"k": k})
        record(f"{name} patches k={k} (dense eval)", dense_acc, dense_ms, [n_patch + 1] * cfg.depth, dense_ms, {"k": k})
        bar.advance(f"{tag}: {name}-patch ViT trained")


def plot(result: dict, path: str) -> str:
    """Test top-1 against inference images/s, one point per variant, model and seed (up and right is better)."""
    records = [r for r in result["records"] if "top1" in r.get("extra", {}) and "img_per_s" in r["extra"]]
    if not records:
        raise NoPlot("no record has a top-1 accuracy and a throughput")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    def label(r: dict) -> str:
        return f"{r['shape'].get('variant', 'scattered')}: {r['op']}"

    for name in sorted({label(r) for r in records}):
        mine = [r for r in records if label(r) == name]
        ax.scatter([r["extra"]["img_per_s"] for r in mine], [100 * r["extra"]["top1"] for r in mine], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("inference images/s (log scale)")
    ax.set_ylabel("test top-1 (%)")
    env = result["environment"]
    ax.set_title(f"digits on {env['device_name']} (torch {env['torch']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
