"""Loads that validate completely first, then commit: RigL, MaskManager, LotteryTicket, ticket files.

A refused load leaves the object exactly as it was (counters, history, masks,
generator, weights); ticket files carry a format version and a sha256 checksum, and
every bad file is a ValueError naming the file and the problem.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

from sparsevit.sparse_training import LotteryTicket, MaskManager, RigL, load_ticket, save_ticket
from sparsevit.sparse_training.tickets import TICKET_FORMAT_VERSION, _checksum, safetensors_available

needs_safetensors = pytest.mark.skipif(not safetensors_available(), reason="safetensors not installed")


def _mlp(seed: int = 0, widths=(32, 32, 32, 16)) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def _rigl(seed: int = 0, widths=(32, 32, 32, 16)) -> RigL:
    model = _mlp(seed, widths)
    return RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, delta_t=2, t_end=9, seed=seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _manager_snapshot(m: MaskManager) -> dict:
    return {
        "masks": {n: (id(l.mask), _bits(l.mask), _bits(l.element_mask)) for n, l in m.layers.items()},
        "densities": dict(m.densities),
        "targets": dict(m.targets),
        "generator": m.generator.get_state().clone(),
        "weights": {k: _bits(v) for k, v in m.model.state_dict().items()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], tuple):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), k
        else:
            assert a[k] == b[k], k


def _rigl_snapshot(r: RigL) -> dict:
    return {
        "counters": {"t": r.t, "delta_t": r.delta_t, "t_end": r.t_end, "alpha": r.alpha,
                     "collect": r.manager.collect_dense_grads},
        "history": copy.deepcopy(r.history),
        "manager": _manager_snapshot(r.manager),
    }


def _trained_rigl() -> RigL:
    r = _rigl(1)
    x = torch.randn(8, 32)
    for _ in range(4):
        r.optimizer.zero_grad()
        r.model(x).square().mean().backward()
        r.optimizer.step()
        r.step()
    assert r.history
    return r


# ---------------------------------------------------------------------------- RigL
def test_rigl_wrong_model_state_changes_nothing() -> None:
    """Before: t, delta_t, t_end, alpha and history were set before the manager refused the masks."""
    target = _rigl(0)
    other = _trained_rigl()
    state = _rigl(0, widths=(32, 32, 16)).state_dict()
    state.update(t=7, delta_t=3, t_end=11, alpha=0.1, history=other.history)
    before = _rigl_snapshot(target)
    with pytest.raises(ValueError, match="layers"):
        target.load_state_dict(state)
    _assert_same(_rigl_snapshot(target), before)


@pytest.mark.parametrize("key, value, match", [
    ("t", -1, "t must be an int >= 0"),
    ("t", "3", "t must be an int >= 0"),
    ("t", True, "t must be an int >= 0"),
    ("delta_t", 0, "delta_t must be an int >= 1"),
    ("t_end", 0, "t_end must be an int >= 1"),
    ("alpha", 1.5, r"alpha must be a float in \[0, 1\]"),
    ("history", "x", "history must be a list of dicts"),
    ("history", [1], "history must be a list of dicts"),
    ("manager", None, "manager must be a mapping"),
    ("t", KeyError, "lacks the key 't'"),
])
def test_rigl_bad_counters_change_nothing(key: str, value, match: str) -> None:
    target = _rigl(0)
    state = _trained_rigl().state_dict()
    if value is KeyError:
        del state[key]
    else:
        state[key] = value
    before = _rigl_snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    _assert_same(_rigl_snapshot(target), before)


def test_rigl_good_load_still_resumes() -> None:
    src = _trained_rigl()
    dst = _rigl(0)
    dst.load_state_dict(src.state_dict())
    assert (dst.t, dst.history) == (src.t, src.history)
    assert all(torch.equal(dst.manager.layers[n].mask, m) for n, m in src.manager.masks().items())


# -------------------------------------------------------------------- MaskManager
def _bad_byte_mask(shape) -> torch.Tensor:
    raw = torch.zeros(shape, dtype=torch.uint8)
    raw.view(-1)[0] = 0x7F
    return raw.view(torch.bool)


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s["masks"].__setitem__("4", torch.ones(3, 3, dtype=torch.bool)), r"mask of layer '4' must have shape \(16, 32\)"),
    (lambda s: s["masks"].__setitem__("4", torch.ones(16, 32)), "mask of layer '4' must be a bool tensor"),
    (lambda s: s["masks"].__setitem__("4", _bad_byte_mask((16, 32))), "mask of layer '4' holds bytes other than 0/1"),
    (lambda s: s["masks"].__setitem__("9", torch.ones(2, 2, dtype=torch.bool)), r"unknown layer\(s\) \['9'\]"),
    (lambda s: s["masks"].pop("2"), r"no entry for layer\(s\) \['2'\]"),
    (lambda s: s.__setitem__("generator", torch.zeros(3, dtype=torch.uint8)), "generator state is invalid"),
    (lambda s: s["densities"].__setitem__("4", 2.0), r"state densities\['4'\] must be a float in \[0, 1\]"),
    (lambda s: s["densities"].pop("4"), "state densities are for layers"),
    (lambda s: s.pop("masks"), "lacks the key 'masks'"),
])
def test_mask_manager_bad_state_changes_nothing(corrupt, match: str) -> None:
    """Before: masks were replaced layer by layer and the load raised half-way (or accepted junk)."""
    target = _rigl(0).manager
    state = _trained_rigl().manager.state_dict()
    corrupt(state)
    before = _manager_snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    _assert_same(_manager_snapshot(target), before)


# ------------------------------------------------------------------- LotteryTicket
def _ticket(seed: int = 0) -> LotteryTicket:
    return LotteryTicket(_mlp(seed), 0.5, scope="layer")


def _pruned_masks() -> dict:
    t = _ticket(5)
    t.prune()
    return t.masks()


@pytest.mark.parametrize("corrupt, match", [
    (lambda m: m.__setitem__("blocks.9.fc", torch.ones(2, 2, dtype=torch.bool)),
     r"unknown layer\(s\) \['blocks.9.fc'\].*valid names: \['0', '2', '4'\]"),
    (lambda m: m.pop("2"), r"no entry for layer\(s\) \['2'\]"),
    (lambda m: m.__setitem__("4", torch.ones(32, 16, dtype=torch.bool)), r"mask of layer '4' must have shape \(16, 32\)"),
    (lambda m: m.__setitem__("4", _bad_byte_mask((16, 32))), "holds bytes other than 0/1"),
    (lambda m: m.__setitem__("4", torch.ones(16, 32, dtype=torch.int64) * 2), "must be a bool tensor"),
])
def test_load_masks_validates_first(corrupt, match: str) -> None:
    """Before: unknown names were ignored and a bad mask raised after earlier layers were replaced."""
    target = _ticket(0)
    masks = _pruned_masks()
    corrupt(masks)
    before = _manager_snapshot(target.manager)
    with pytest.raises(ValueError, match=match):
        target.load_masks(masks)
    _assert_same(_manager_snapshot(target.manager), before)


def test_load_masks_good() -> None:
    target = _ticket(0)
    masks = _pruned_masks()
    target.load_masks(masks)
    for name, layer in target.manager.layers.items():
        assert torch.equal(layer.mask, masks[name])
        assert bool((layer.weight[~layer.element_mask] == 0).all())


def test_lottery_load_state_dict_validates_first() -> None:
    target = _ticket(0)
    source = _ticket(3)
    source.prune()  # masks that differ from the target's, so a half-done load would show
    state = source.state_dict()
    state["rewind_state"] = {"0.weight": "junk"}
    before = _manager_snapshot(target.manager)
    history, rewind = target.history, target.rewind_state
    with pytest.raises(ValueError, match="rewind_state"):
        target.load_state_dict(state)
    _assert_same(_manager_snapshot(target.manager), before)
    assert target.history is history and len(history) == 1 and target.rewind_state is rewind


# -------------------------------------------------------------------- ticket files
def _masks() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.rand(4, 8, generator=g) < 0.5, "b": torch.rand(2, 3, generator=g) < 0.5}


def _save(tmp_path, use_safetensors: bool, name: str = "ticket") -> str:
    path = os.fspath(tmp_path / name)
    save_ticket(path, _masks(), {"round": 1}, use_safetensors=use_safetensors)
    return path


FORMATS = [pytest.param(True, id="safetensors", marks=needs_safetensors), pytest.param(False, id="torch")]


@pytest.mark.parametrize("use_safetensors", FORMATS)
def test_round_trip_carries_version_and_checksum(tmp_path, use_safetensors: bool) -> None:
    path = _save(tmp_path, use_safetensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks, meta = load_ticket(path)
    assert meta == {"round": "1"}
    want = _masks()
    assert set(masks) == set(want)
    assert all(m.dtype == torch.bool and torch.equal(m, want[n]) for n, m in masks.items())


@pytest.mark.parametrize("use_safetensors", FORMATS)
@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt|not a sparsevit ticket"),
    (lambda b: b"", "is empty"),
    (lambda b: b"\x00garbage" * 5, "truncated or corrupt|neither a safetensors nor a torch.save file"),
    (lambda b: b"hello world, not a ticket at all", "neither a safetensors nor a torch.save file|truncated or corrupt"),
])
def test_damaged_files_raise_value_error(tmp_path, use_safetensors: bool, damage, match: str) -> None:
    """Before: raw SafetensorError / RuntimeError / UnpicklingError naming no file."""
    path = _save(tmp_path, use_safetensors, "damaged.ticket")
    with open(path, "rb") as fh:
        blob = fh.read()
    with open(path, "wb") as fh:
        fh.write(damage(blob))
    with pytest.raises(ValueError, match=match) as err:
        load_ticket(path)
    assert "damaged.ticket" in str(err.value)


@needs_safetensors
def test_corruption_inside_data_region_is_caught(tmp_path) -> None:
    """Before: a flipped mask bit inside the data region loaded silently."""
    path = _save(tmp_path, True, "flipped.ticket")
    with open(path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)[0]
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last ^ 1]))  # still a valid bool byte: only the checksum can tell
    with pytest.raises(ValueError, match=r"flipped.ticket.*checksum mismatch"):
        load_ticket(path)


def test_torch_format_checksum_mismatch(tmp_path) -> None:
    path = tmp_path / "bad_sum.ticket"
    masks = _masks()
    torch.save({"format": "sparsevit-ticket", "format_version": str(TICKET_FORMAT_VERSION),
                "sha256": "0" * 64, "masks": masks, "metadata": {}}, path)
    with pytest.raises(ValueError, match=r"bad_sum.ticket.*checksum mismatch"):
        load_ticket(path)


def _write_safetensors(path, masks: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file(masks, os.fspath(path), metadata=meta)


@needs_safetensors
def test_bool_byte_0x7f_is_refused(tmp_path) -> None:
    """Before: a bool byte 0x7F loaded as a 'True' whose integer value is 127."""
    path = tmp_path / "byte.ticket"
    masks = {"a": _bad_byte_mask((4, 4))}
    meta = {"format": "sparsevit-ticket", "format_version": str(TICKET_FORMAT_VERSION), "sha256": _checksum(masks)}
    _write_safetensors(path, masks, meta)
    with pytest.raises(ValueError, match=r"byte.ticket.*mask 'a' holds bytes other than 0/1"):
        load_ticket(path)
    with pytest.raises(ValueError, match="holds bytes other than 0/1"):
        save_ticket(tmp_path / "never", masks)


@needs_safetensors
@pytest.mark.parametrize("meta, masks, match", [
    ({"format_version": "99"}, None, "format version '99' is not supported"),
    ({"format_version": "2", "sha256": None}, None, "has no checksum"),
    ({}, {"a": torch.ones(4, 4, dtype=torch.uint8)}, "mask 'a' must be bool, got torch.uint8"),
    ({}, {"a": torch.ones(4, dtype=torch.bool)}, "mask 'a' must have at least 2 dims"),
])
def test_bad_header_content(tmp_path, meta: dict, masks, match: str) -> None:
    path = tmp_path / "odd.ticket"
    masks = _masks() if masks is None else masks
    full = {"format": "sparsevit-ticket", "format_version": str(TICKET_FORMAT_VERSION), "sha256": _checksum(masks)}
    full.update(meta)
    _write_safetensors(path, masks, {k: v for k, v in full.items() if v is not None})
    with pytest.raises(ValueError, match=f"odd.ticket.*{match}"):
        load_ticket(path)


@pytest.mark.parametrize("use_safetensors", FORMATS)
def test_legacy_files_load_with_a_warning(tmp_path, use_safetensors: bool) -> None:
    """Files of the first format (no version, no checksum) still load, checked, with a warning."""
    path = tmp_path / "legacy.ticket"
    masks = _masks()
    if use_safetensors:
        _write_safetensors(path, masks, {"format": "sparsevit-ticket", "round": "2"})
    else:
        torch.save({"format": "sparsevit-ticket", "masks": masks, "metadata": {"round": "2"}}, path)
    with pytest.warns(UserWarning, match=r"legacy.ticket.*no format version.*re-save"):
        loaded, meta = load_ticket(path)
    assert meta == {"round": "2"}
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)


def test_reserved_metadata_keys(tmp_path) -> None:
    with pytest.raises(ValueError, match="metadata key 'sha256' is reserved"):
        save_ticket(tmp_path / "t", _masks(), {"sha256": "x"})


def test_ticket_into_model_with_wrong_shapes(tmp_path) -> None:
    path = tmp_path / "t.ticket"
    save_ticket(path, {"0": torch.ones(8, 8, dtype=torch.bool), "2": torch.ones(32, 32, dtype=torch.bool),
                       "4": torch.ones(16, 32, dtype=torch.bool)})
    masks, _ = load_ticket(path)
    with pytest.raises(ValueError, match=r"mask of layer '0' must have shape \(32, 32\)"):
        _ticket(0).load_masks(masks)


@needs_safetensors
def test_safetensors_header_size_starting_with_a_pickle_byte(tmp_path) -> None:
    """Before: a header of 0x180 bytes began with 0x80, was taken for a pickle and refused."""
    path = tmp_path / "t.ticket"
    for pad in range(400):
        save_ticket(path, _masks(), {"note": "x" * pad}, use_safetensors=True)
        with open(path, "rb") as fh:
            if fh.read(1) == b"\x80":
                break
    else:
        pytest.fail("no padding gave a header size with low byte 0x80")
    masks, meta = load_ticket(path)
    assert meta["note"] == "x" * pad and all(torch.equal(masks[n], m) for n, m in _masks().items())
