"""Multi-view images: views and distractors where the metadata says, single/multi-view counts, patterns,
determinism, train/test splits, errors."""

from __future__ import annotations

import pytest
import torch

from sparsevit.datasets import MultiViewDataset, class_patterns, multi_view_dataset, multi_view_splits


def _patch(ds: MultiViewDataset, n: int, i: int) -> torch.Tensor:
    p, g = ds.patch, ds.grid
    r, c = i // g, i % g
    return ds.images[n, 0, r * p:(r + 1) * p, c * p:(c + 1) * p]


def _expected(ds: MultiViewDataset, n: int) -> torch.Tensor:
    """The noise-free image of sample n rebuilt by hand from its metadata, patch by patch."""
    p, g = ds.patch, ds.grid
    out = torch.zeros(1, g * p, g * p)
    y = int(ds.labels[n])
    for j, i in enumerate(ds.view_patches[n].tolist()):
        if i >= 0:
            out[0, (i // g) * p:(i // g + 1) * p, (i % g) * p:(i % g + 1) * p] += ds.amplitude * ds.patterns[y, j]
    for i, k, j in zip(ds.distractor_patches[n].tolist(), ds.distractor_classes[n].tolist(), ds.distractor_views[n].tolist()):
        out[0, (i // g) * p:(i // g + 1) * p, (i % g) * p:(i % g + 1) * p] += ds.distractor * ds.patterns[k, j]
    return out


def test_shapes_and_dtypes() -> None:
    ds = multi_view_dataset(50, num_classes=5, views=3, patch=3, grid=5, num_distractors=2)
    assert ds.images.shape == (50, 1, 15, 15) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (50,) and ds.labels.dtype == torch.int64
    assert ds.view_patches.shape == (50, 3) and ds.distractor_patches.shape == (50, 2)
    assert ds.patterns.shape == (5, 3, 3, 3) and ds.num_classes == 5 and ds.views == 3 and len(ds) == 50
    assert torch.bincount(ds.labels, minlength=5).tolist() == [10] * 5  # balanced classes


def test_noise_free_images_are_exactly_the_metadata() -> None:
    ds = multi_view_dataset(40, views=3, noise=0.0, distractor=0.3, num_distractors=2, seed=1)
    for n in range(len(ds)):
        torch.testing.assert_close(ds.images[n], _expected(ds, n), rtol=0, atol=0)
        y = int(ds.labels[n])
        for j, i in enumerate(ds.view_patches[n].tolist()):
            if i >= 0:
                assert torch.equal(ds.patch_pixels(n, i), ds.amplitude * ds.patterns[y, j])


def test_views_with_noise_are_amplitude_pattern_plus_noise() -> None:
    sigma = 0.1
    ds = multi_view_dataset(200, noise=sigma, amplitude=2.0, seed=2)
    residuals = []
    for n in range(len(ds)):
        y = int(ds.labels[n])
        for j, i in enumerate(ds.view_patches[n].tolist()):
            if i >= 0:
                residuals.append((_patch(ds, n, i) - 2.0 * ds.patterns[y, j]).flatten())
    r = torch.cat(residuals)
    assert r.abs().max() < 6 * sigma and abs(float(r.std()) - sigma) < 0.01 and abs(float(r.mean())) < 0.01
    # everything else (background and distractor patches included) is the noise alone
    noise = ds.images - torch.stack([_expected(ds, n) for n in range(len(ds))])
    assert abs(float(noise.std()) - sigma) < 0.005 and abs(float(noise.mean())) < 0.005


def test_multi_view_has_all_views_single_view_exactly_one() -> None:
    ds = multi_view_dataset(300, views=3, single_view_fraction=0.3, num_distractors=4, seed=3)
    present = ds.views_present.sum(1)
    assert torch.equal(present[ds.multi_view], torch.full_like(present[ds.multi_view], 3))
    assert torch.equal(present[ds.single_view], torch.ones_like(present[ds.single_view]))
    # all views and distractors of a sample at distinct patches inside the grid
    for n in range(len(ds)):
        used = [i for i in ds.view_patches[n].tolist() if i >= 0] + ds.distractor_patches[n].tolist()
        assert len(set(used)) == len(used) and all(0 <= i < 16 for i in used)
    # distractors come from other classes, all views of a single-view class get chosen
    assert not (ds.distractor_classes == ds.labels.unsqueeze(1)).any()
    chosen = ds.view_patches[ds.single_view].ge(0).float().argmax(1)
    assert set(chosen.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("q,n,count", [(0.2, 100, 20), (0.25, 10, 3), (0.0, 30, 0), (1.0, 30, 30), (0.3, 1, 0)])
def test_single_view_fraction_is_exact(q: float, n: int, count: int) -> None:
    ds = multi_view_dataset(n, single_view_fraction=q)
    assert int(ds.single_view.sum()) == count


def test_positions_are_spread_over_the_grid() -> None:
    ds = multi_view_dataset(2000, seed=4)
    counts = torch.bincount(ds.view_patches[ds.view_patches >= 0], minlength=16).float()
    assert counts.min() > 0.7 * counts.mean()


def test_patterns_unit_rms_and_orthogonal_when_they_fit() -> None:
    pats = class_patterns(4, 3, patch=4, seed=5)  # 12 patterns in 16 dimensions: orthogonal
    flat = pats.reshape(12, 16).double()
    torch.testing.assert_close(flat @ flat.T, 16 * torch.eye(12, dtype=torch.float64), atol=1e-4, rtol=0)
    many = class_patterns(10, 2, patch=4, seed=5).reshape(20, 16)  # do not fit: normalised only
    torch.testing.assert_close(many.norm(dim=1), torch.full((20,), 4.0), atol=1e-5, rtol=0)


def test_determinism_per_seed() -> None:
    a, b, c = multi_view_dataset(60, seed=7), multi_view_dataset(60, seed=7), multi_view_dataset(60, seed=8)
    for name in ("images", "labels", "single_view", "view_patches", "distractor_patches", "distractor_classes", "patterns"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.images, c.images) and not torch.equal(a.patterns, c.patterns)
    d = multi_view_dataset(60, seed=8, pattern_seed=7)
    assert torch.equal(d.patterns, a.patterns) and not torch.equal(d.images, a.images)


def test_splits_share_patterns_differ_in_samples() -> None:
    train, test = multi_view_splits(100, 50, noise=0.0, seed=3, pattern_seed=11)
    assert len(train) == 100 and len(test) == 50
    assert torch.equal(train.patterns, test.patterns)
    assert torch.equal(train.patterns, class_patterns(10, 2, 4, seed=11))
    assert not torch.equal(train.images[:50], test.images)
    for ds in (train, test):
        for n in range(0, len(ds), 7):
            torch.testing.assert_close(ds.images[n], _expected(ds, n), rtol=0, atol=0)
    other_train, other_test = multi_view_splits(100, 50, noise=0.0, seed=4, pattern_seed=11)
    assert torch.equal(other_train.patterns, train.patterns) and not torch.equal(other_train.images, train.images)
    again = multi_view_splits(100, 50, noise=0.0, seed=3, pattern_seed=11)
    assert torch.equal(again[0].images, train.images) and torch.equal(again[1].images, test.images)


def test_batches_cover_the_split() -> None:
    ds = multi_view_dataset(25)
    seen = torch.cat([y for _, y in ds.batches(8, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == sorted(ds.labels.tolist())


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"single_view_fraction": 1.5}, ValueError, "single_view_fraction"),
    ({"single_view_fraction": -0.1}, ValueError, "single_view_fraction"),
    ({"single_view_fraction": "0.2"}, TypeError, "single_view_fraction"),
    ({"views": 0}, ValueError, "views"),
    ({"views": 2.0}, TypeError, "views"),
    ({"num_classes": 1}, ValueError, "num_classes"),
    ({"grid": 1}, ValueError, "grid"),
    ({"grid": 2, "views": 3, "num_distractors": 2}, ValueError, "grid"),
    ({"patch": 0}, ValueError, "patch"),
    ({"noise": -1.0}, ValueError, "noise"),
    ({"distractor": -0.5}, ValueError, "distractor"),
    ({"amplitude": 0.0}, ValueError, "amplitude"),
    ({"num_distractors": -1}, ValueError, "num_distractors"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": True}, TypeError, "seed"),
    ({"pattern_seed": "a"}, TypeError, "pattern_seed"),
])
def test_bad_arguments(kwargs: dict, exc: type, word: str) -> None:
    with pytest.raises(exc, match=word):
        multi_view_dataset(10, **kwargs)


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="n must"):
        multi_view_dataset(-1)
    with pytest.raises(TypeError, match="n must"):
        multi_view_dataset(2.5)
    with pytest.raises(ValueError, match="n_test"):
        multi_view_splits(10, -2)
    with pytest.raises(ValueError, match="grid"):
        multi_view_splits(10, 10, grid=1)
    assert len(multi_view_dataset(0)) == 0
