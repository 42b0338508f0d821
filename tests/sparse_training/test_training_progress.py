"""Progress of sparse training: logging records and callbacks for RigL updates and lottery rounds."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsevit.sparse_training import LotteryTicket, RigL, SET
from st_helpers import tiny_vit, train_step


def test_rigl_updates_are_logged_and_passed_to_the_callback(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    rigl = RigL(model, opt, 0.8, delta_t=2, t_end=6, granularity="element", distribution="uniform", callback=seen.append)
    with caplog.at_level(logging.DEBUG, logger="sparsevit.sparse_training"):
        for step in range(6):
            train_step(model, opt, step)
            rigl.step()
    assert [r["step"] for r in seen] == [h["step"] for h in rigl.history] == [2, 4]
    assert seen[0] == rigl.history[0] and seen[0] is not rigl.history[0]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 2 and infos[0].startswith("RigL step 2: drop fraction")
    assert "total sparsity 0.8" in infos[0]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 2 * len(rigl.manager.layers) and all("units dropped/regrown, sparsity" in m for m in debug)


def test_set_callback_and_a_bad_callback() -> None:
    model = tiny_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="callback must be a callable"):
        SET(model, opt, 0.5, delta_t=2, t_end=4, callback="print")


def test_lottery_run_reports_each_round(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_vit()
    ticket = LotteryTicket(model, prune_fraction=0.5)

    def train(m, t):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        t.attach(opt)
        train_step(m, opt, 0)
        return {"acc": 0.5}

    rounds = []
    with caplog.at_level(logging.INFO, logger="sparsevit.sparse_training"):
        ticket.run(train, 2, progress=lambda r, total, record: rounds.append((r, total, record["metrics"]["acc"])))
    assert rounds == [(1, 3, 0.5), (2, 3, 0.5), (3, 3, 0.5)]
    messages = [r.getMessage() for r in caplog.records if "LotteryTicket round" in r.getMessage()]
    assert [m.split(":")[0] for m in messages] == ["LotteryTicket round 1/3", "LotteryTicket round 2/3", "LotteryTicket round 3/3"]
    with pytest.raises(TypeError, match="progress must be a callable"):
        ticket.run(train, 0, progress=3)
