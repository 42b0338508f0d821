"""Short runs on scattered digits: the dense ViT and DynamicViT both clearly beat chance."""

from __future__ import annotations

import torch

from sparsevit.datasets import scattered_digits_splits
from sparsevit.models import DynamicViT, DynamicViTLoss
from sparsevit.models.train_loop import evaluate, train
from vit_factory import tiny_vit


def test_dataset_shapes_and_placement() -> None:
    tr, te = scattered_digits_splits(canvas=32, scale=1, noise=0.1, seed=1)
    assert len(tr) + len(te) == 1797 and tr.images.shape[1:] == (3, 32, 32)
    t, l, h, w = tr.boxes[0].tolist()
    inside = tr.images[0, 0, t:t + h, l:l + w].abs().mean()
    outside = tr.images[0, 0].abs().sum() - tr.images[0, 0, t:t + h, l:l + w].abs().sum()
    assert inside > outside / (32 * 32 - h * w)  # the digit is where the box says
    tr2, _ = scattered_digits_splits(canvas=32, scale=1, noise=0.1, seed=1)
    assert torch.equal(tr.images, tr2.images)


def test_dense_then_dynamicvit_learn() -> None:
    torch.manual_seed(0)
    # Digits on the 8-pixel patch grid, average pooling: a short run learns.
    train_set, test_set = scattered_digits_splits(canvas=32, scale=1, noise=0.1, seed=0, align=8)
    cfg = dict(num_classes=10, embed_dim=48, depth=4, num_heads=3, class_token=False, global_pool="avg")
    vit = tiny_vit(**cfg)
    train(vit, lambda e: train_set.batches(64, shuffle=True, seed=e), epochs=3, lr=2e-3)
    dense_acc = evaluate(vit.eval(), test_set.batches(256))
    assert dense_acc > 0.3, dense_acc  # chance is 0.1

    teacher = tiny_vit(**cfg)
    teacher.load_state_dict(vit.state_dict())
    model = DynamicViT(vit, keep_ratio=0.7, prune_at=[1, 2])
    loss_fn = DynamicViTLoss()

    def step(m, images, labels):
        with torch.no_grad():
            t_logits = teacher(images)
        return loss_fn(m(images), labels, teacher_logits=t_logits)

    train(model, lambda e: train_set.batches(64, shuffle=True, seed=10 + e), epochs=1, lr=5e-4, step_fn=step)
    acc = evaluate(model.eval(), test_set.batches(256))
    assert acc > 0.3, acc
