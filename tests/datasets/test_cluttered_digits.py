"""Cluttered digits: every image is rebuilt exactly from its metadata (digit box, fragment boxes and
sources), fragments never overlap the digit, the splits use disjoint digits, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sklearn")

from sparsevit.datasets import cluttered_digits_splits, scattered_digits_splits, upscaled_digits  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return cluttered_digits_splits(canvas=32, scale=2, noise=0.0, clutter=3, fragment=4, seed=1)


def test_images_rebuild_from_metadata(splits) -> None:
    big, labels = upscaled_digits(2)
    for split in splits:
        assert split.images.shape[1:] == (3, 32, 32)
        assert torch.equal(split.labels, labels[split.sources])
        for i in range(0, len(split), 37):
            rebuilt = torch.zeros(32, 32)
            t, l, h, w = split.boxes[i].tolist()
            assert (h, w) == (16, 16)
            rebuilt[t:t + h, l:l + w] += big[split.sources[i]]
            for (ft, fl, fh, fw), (src, r0, c0) in zip(split.clutter_boxes[i].tolist(), split.clutter_sources[i].tolist()):
                assert (fh, fw) == (8, 8) and src != int(split.sources[i])
                assert 0 <= r0 <= 4 and 0 <= c0 <= 4
                rebuilt[ft:ft + fh, fl:fl + fw] += big[src, 2 * r0:2 * r0 + 8, 2 * c0:2 * c0 + 8]
                disjoint = ft + fh <= t or t + h <= ft or fl + fw <= l or l + w <= fl
                assert disjoint, "a fragment overlaps the digit"
            torch.testing.assert_close(split.images[i, 0], rebuilt)
            assert torch.equal(split.images[i, 0], split.images[i, 2])


def test_splits_hold_disjoint_digits_and_fragments_from_their_own_split(splits) -> None:
    train, test = splits
    train_src, test_src = set(train.sources.tolist()), set(test.sources.tolist())
    assert not train_src & test_src
    assert len(train_src) + len(test_src) == 1797 and len(test) == round(0.25 * 1797)
    assert set(train.clutter_sources[..., 0].flatten().tolist()) <= train_src
    assert set(test.clutter_sources[..., 0].flatten().tolist()) <= test_src


def test_deterministic_per_seed_and_unaligned_by_default() -> None:
    a, _ = cluttered_digits_splits(canvas=32, clutter=1, seed=3)
    b, _ = cluttered_digits_splits(canvas=32, clutter=1, seed=3)
    c, _ = cluttered_digits_splits(canvas=32, clutter=1, seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert bool((a.boxes[:, :2] % 8 != 0).any())  # digits off the 8-pixel patch grid
    aligned, _ = cluttered_digits_splits(canvas=32, clutter=1, align=8, seed=3)
    assert bool((aligned.boxes[:, :2] % 8 == 0).all())


def test_no_clutter_and_noise_statistics() -> None:
    train, _ = cluttered_digits_splits(canvas=24, clutter=0, noise=0.5, seed=0)
    assert train.clutter_boxes.shape == (len(train), 0, 4)
    background = train.images[:, 0].clone()
    for i, (t, l, h, w) in enumerate(train.boxes.tolist()):
        background[i, t:t + h, l:l + w] = float("nan")
    values = background[~background.isnan()]
    assert abs(float(values.std()) - 0.5) < 0.02 and abs(float(values.mean())) < 0.02


def test_the_scattered_split_is_unchanged_by_the_shared_loader() -> None:
    train, _ = scattered_digits_splits(canvas=32, scale=2, noise=0.0, seed=0, align=8)
    big, _ = upscaled_digits(2)
    t, l, h, w = train.boxes[0].tolist()
    patch = train.images[0, 0, t:t + h, l:l + w]
    assert any(torch.equal(patch, d) for d in big)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"canvas": 31}, ValueError, "canvas"),
    ({"fragment": 9}, ValueError, "fragment"),
    ({"fragment": 0}, ValueError, "fragment"),
    ({"clutter": -1}, ValueError, "clutter"),
    ({"noise": -0.1}, ValueError, "noise"),
    ({"test_fraction": 1.0}, ValueError, "test_fraction"),
    ({"scale": 1.5}, TypeError, "scale"),
    ({"align": 0}, ValueError, "align"),
    ({"seed": True}, TypeError, "seed"),
])
def test_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cluttered_digits_splits(**kwargs)
