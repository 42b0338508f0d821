"""Why DynamicViT's keep ratio drifts on the digits suite: the gradient each loss sends to a predictor.

    python benchmarks/dynamicvit_gradients.py [--epochs 10 30] [--seed 0]

For a dense ViT trained ``epochs`` epochs on the scattered digits of the ``digits`` suite, wraps
it in DynamicViT (ρ = 0.7) and prints, for one training batch and the same Gumbel draws, the
gradient norm that the cross-entropy and the ratio loss (λ = 2) each send to the first
predictor's last layer, with the exact keep gradient and with ``keep_grad_clip``.  The exact
attention keep gradient at a dropped key, ``e_ij / (S_i + ε)``, grows with the sharpness of the
trained attention; once it is 10⁴× the ratio loss's, the ratio no longer steers the predictors.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from sparsevit.datasets import scattered_digits_splits
from sparsevit.models import DynamicViT
from sparsevit.models.losses import ratio_loss
from sparsevit.models.train_loop import train


def predictor_grad_norm(model: DynamicViT, images: torch.Tensor, labels: torch.Tensor, loss: str) -> float:
    """‖∂L/∂θ‖ of the first predictor's last Linear for ``L`` = CE or 2·ratio, Gumbel noise seeded alike."""
    torch.manual_seed(3)
    out = model(images)
    value = F.cross_entropy(out.logits, labels) if loss == "ce" else 2 * ratio_loss(out.decisions, out.keep_ratios)
    model.zero_grad(set_to_none=True)
    value.backward()
    return float(model.score_predictor[0].out_conv[-2].weight.grad.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, nargs="+", default=[10, 30])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    train_set, _ = scattered_digits_splits(canvas=40, scale=2, noise=0.2, seed=args.seed, align=8)
    images, labels = train_set.images[:64], train_set.labels[:64]
    print("dense epochs | keep gradient | CE grad | ratio grad | CE / ratio")
    for epochs in args.epochs:
        torch.manual_seed(args.seed)
        dense = VisionTransformer(img_size=40, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10,
                                  global_pool="avg")
        train(dense, lambda e: train_set.batches(64, shuffle=True, seed=100 * args.seed + e), epochs, lr=2e-3)
        for clip in (None, 0.1):
            model = DynamicViT(copy.deepcopy(dense), keep_ratio=0.7, keep_grad_clip=clip).train()
            ce = predictor_grad_norm(model, images, labels, "ce")
            ratio = predictor_grad_norm(model, images, labels, "ratio")
            what = "exact" if clip is None else f"clipped {clip}"
            print(f"{epochs} | {what} | {ce:.3g} | {ratio:.3g} | {ce / ratio:.3g}")


if __name__ == "__main__":
    main()
