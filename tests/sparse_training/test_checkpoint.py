"""Checkpoints: a resumed RigL / SET run makes bit-identical decisions; tickets round-trip through files."""

from __future__ import annotations

import io

import pytest
import torch
from st_helpers import tiny_vit, train_step

from sparsevit.sparse_training import SET, RigL, load_ticket, save_ticket
from sparsevit.sparse_training.tickets import safetensors_available


def _build(cls, seed: int, block=None):
    model = tiny_vit(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    alg = cls(model, opt, 0.5 if block else 0.8, delta_t=2, t_end=9, seed=seed,
              granularity="block" if block else "element", block_size=block)
    return model, opt, alg


def _run(cls, steps: int, resume_at=None, block=None):
    model, opt, alg = _build(cls, 0, block)
    trace = []
    for t in range(1, steps + 1):
        if resume_at is not None and t == resume_at + 1:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "alg": alg.state_dict()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf, weights_only=False)
            model, opt, alg = _build(cls, 123, block)  # different init and seed: everything must come from the checkpoint
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            alg.load_state_dict(ckpt["alg"])
        train_step(model, opt, t)
        alg.step()
        trace.append({n: m.clone() for n, m in alg.manager.masks().items()})
    return trace, {k: v.clone() for k, v in model.state_dict().items()}, alg


@pytest.mark.parametrize("cls,block", [(RigL, None), (SET, None), (SET, 16)])
@pytest.mark.parametrize("resume_at", [3, 4])  # between updates, and right after one
def test_resume_is_bit_identical(cls, block, resume_at: int) -> None:
    full_trace, full_weights, full = _run(cls, 9, block=block)
    res_trace, res_weights, res = _run(cls, 9, resume_at, block=block)
    assert len(full.history) == 4
    for a, b in zip(full_trace, res_trace):
        assert all(torch.equal(a[n], b[n]) for n in a)
    for k in full_weights:
        assert torch.equal(full_weights[k], res_weights[k]), k
    assert full.history == res.history
    assert torch.equal(full.manager.generator.get_state(), res.manager.generator.get_state())


def test_load_state_dict_checks() -> None:
    _, _, rigl = _build(RigL, 0)
    _, _, set_ = _build(SET, 0)
    with pytest.raises(ValueError, match="grow="):
        rigl.load_state_dict(set_.state_dict())
    with pytest.raises(TypeError, match="state must be a mapping"):
        rigl.load_state_dict([1, 2])  # type: ignore[arg-type]
    model = tiny_vit()
    block = RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, t_end=5, granularity="block", block_size=16)
    with pytest.raises(ValueError, match="granularity"):
        block.manager.load_state_dict(rigl.manager.state_dict())


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_ticket_file_round_trip(tmp_path, use_safetensors: bool) -> None:
    if use_safetensors and not safetensors_available():
        pytest.skip("safetensors not installed")
    _, _, alg = _build(RigL, 0)
    masks = alg.manager.masks()
    path = tmp_path / "ticket.bin"
    fmt = save_ticket(path, masks, {"round": 3}, use_safetensors=use_safetensors)
    assert fmt == ("safetensors" if use_safetensors else "torch")
    loaded, meta = load_ticket(path)
    assert meta == {"round": "3"}
    assert set(loaded) == set(masks)
    for n in masks:
        assert loaded[n].dtype == torch.bool and torch.equal(loaded[n], masks[n])


def test_ticket_errors(tmp_path) -> None:
    with pytest.raises(TypeError, match=r"masks\['a'\] must be a bool torch.Tensor"):
        save_ticket(tmp_path / "t", {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="does not exist"):
        load_ticket(tmp_path / "missing")
    other = tmp_path / "other.pt"
    torch.save({"x": torch.ones(1)}, other)
    with pytest.raises(ValueError, match="not a sparsevit ticket"):
        load_ticket(other)
