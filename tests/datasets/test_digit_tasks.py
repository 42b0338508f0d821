"""Digit target tasks: label rules by hand, the translation against a per-pixel loop, noise, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from sparsevit.datasets import DIGIT_TASKS, digit_task
from sparsevit.datasets.digit_tasks import LABEL_RULES, task_labels, translate


def _images(n: int = 30, c: int = 1, side: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def _shift_by_loop(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    for i in range(h):
        for j in range(w):
            si, sj = i - dy, j - dx
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = img[:, si, sj]
    return out


def test_label_rules_by_hand() -> None:
    d = torch.arange(10)
    assert task_labels("identity", d).tolist() == list(range(10))
    assert task_labels("parity", d).tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert task_labels("at_least_5", d).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert task_labels("mod3", d).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    for rule, (classes, _) in LABEL_RULES.items():
        labels = task_labels(rule, d)
        assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(classes))


def test_translate_matches_loop() -> None:
    x = _images(n=9, c=3, side=6)
    offsets = torch.tensor([[dy, dx] for dy in (-2, 0, 1) for dx in (-1, 0, 2)])
    out = translate(x, offsets)
    for n in range(9):
        torch.testing.assert_close(out[n], _shift_by_loop(x[n], int(offsets[n, 0]), int(offsets[n, 1])), rtol=0, atol=0)


def test_unshifted_tasks_keep_images_and_relabel() -> None:
    x, d = _images(), torch.arange(30) % 10
    task = digit_task("at_least_5", x, d)
    assert torch.equal(task.images, x) and task.images.data_ptr() != x.data_ptr()
    assert task.labels.tolist() == [int(v >= 5) for v in d.tolist()] and task.num_classes == 2
    assert torch.equal(task.offsets, torch.zeros(30, 2, dtype=torch.int64)) and len(task) == 30


def test_shifted_task_is_translate_plus_noise() -> None:
    x, d = _images(n=400), torch.arange(400) % 10
    before = x.clone()
    task = digit_task("shifted_parity", x, d, seed=3)
    assert torch.equal(x, before)  # inputs untouched
    spec = DIGIT_TASKS["shifted_parity"]
    assert int(task.offsets.abs().max()) == spec.shift and len(torch.unique(task.offsets, dim=0)) == 9
    residual = task.images - torch.stack([_shift_by_loop(x[n], *task.offsets[n].tolist()) for n in range(400)])
    assert abs(float(residual.std()) - spec.noise) < 0.01 and abs(float(residual.mean())) < 0.005
    assert task.labels.tolist() == [v % 2 for v in d.tolist()] and task.num_classes == 2


def test_deterministic_per_seed() -> None:
    x, d = _images(), torch.arange(30) % 10
    a, b, c = (digit_task("shifted_identity", x, d, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.images, b.images) and torch.equal(a.offsets, b.offsets)
    assert not torch.equal(a.images, c.images)


def test_bad_input_errors() -> None:
    x, d = _images(n=4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="name"):
        digit_task("xor", x, d)
    with pytest.raises(ValueError, match="digits"):
        digit_task("parity", x, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="digits"):
        digit_task("parity", x, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="one label per image"):
        digit_task("parity", x, d[:3])
    with pytest.raises(TypeError, match="digits"):
        digit_task("parity", x, [0, 1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="images"):
        digit_task("parity", x[:, 0], d)
    with pytest.raises(TypeError, match="seed"):
        digit_task("parity", x, d, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rule"):
        task_labels("xor", d)
    with pytest.raises(ValueError, match="offsets"):
        translate(x, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="offsets"):
        translate(x, torch.full((4, 2), 8))
