"""The minimal training loop: per-parameter learning rates and its loss history."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsevit.models.train_loop import evaluate, train


def test_lr_for_freezes_a_group_and_trains_the_other() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    first = model[0].weight.detach().clone()
    last = model[2].weight.detach().clone()
    history = train(model, lambda e: [(x, y)] * 4, epochs=3, lr=1e-2, weight_decay=0.0,
                    lr_for=lambda name: 0.0 if name.startswith("0.") else 1e-2)
    assert torch.equal(model[0].weight, first)  # lr 0: untouched
    assert not torch.equal(model[2].weight, last)
    assert len(history) == 3 and history[-1] < history[0]
    assert 0.0 <= evaluate(model, [(x, y)]) <= 1.0
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train(model, lambda e: [(x, y)], epochs=0)
