"""Scenarios run by ``test_fsdp2.py`` inside 2 gloo processes, each model ``fully_shard``-ed over a CPU mesh.

Every scenario builds the same model twice: sharded over the 2 ranks (each rank
training on its half of the global batch) and whole in this process (the whole
batch), and checks the sharded run against the single-process one.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2


class MLP(nn.Module):
    """Three sparsifiable layers and a head; ``rows`` sets fc2's output rows (uneven shards)."""

    def __init__(self, rows: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, rows)
        self.fc3 = nn.Linear(rows, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def data(step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def shard_model(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for name in ("fc1", "fc2", "fc3"):
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rank, half = dist.get_rank(), x.shape[0] // WORLD
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def full_masks(manager) -> dict[str, torch.Tensor]:
    return {n: layer.full_mask() for n, layer in manager.layers.items()}


def assert_exact_zeros(manager, grads: bool = False) -> None:
    """Masked weights (and, with ``grads``, gradients: between backward and the mask update) are exactly zero."""
    for name, layer in manager.layers.items():
        w = layer.local_weight()
        assert bool((w[~layer.element_mask] == 0).all()), f"{name}: masked weights not zero on rank {dist.get_rank()}"
        g = layer.weight.grad
        if grads:
            assert g is not None, f"{name}: no gradient"
            g = g.to_local()
            assert bool((g[~layer.element_mask] == 0).all()), f"{name}: masked gradient not zero"


def make_trainer(kind: str, model: nn.Module, opt: torch.optim.Optimizer, granularity: str):
    from sparsevit.sparse_training import SET, RigL

    block = 16 if granularity == "block" else None
    cls = {"rigl": RigL, "set": SET}[kind]
    return cls(model, opt, 0.5 if block else 0.8, delta_t=2, t_end=9, alpha=0.4, seed=3, granularity=granularity,
               block_size=block)


def train(model: nn.Module, opt, trainer, steps: range, sharded: bool, accumulate: int = 1,
          check: Optional[Callable] = None) -> None:
    from torch.distributed.fsdp import FSDPModule

    for t in steps:
        x, y = data(t)
        if sharded:
            x, y = local_batch(x, y)
        opt.zero_grad()
        parts = torch.chunk(torch.arange(x.shape[0]), accumulate)
        for i, idx in enumerate(parts):
            if sharded and isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(i == len(parts) - 1)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) * (len(idx) / x.shape[0])
            loss.backward()
        if check is not None:
            check()
        opt.step()
        trainer.step()


def scenario_rigl_matches_single_process(kind: str, granularity: str, accumulate: int = 1) -> dict:
    """Masks after 4 updates equal the unsharded run's; exact zeros on every rank; comm per update recorded."""
    ref = MLP()
    sharded = shard_model(copy.deepcopy(ref))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9)
    ref_alg = make_trainer(kind, ref, ref_opt, granularity)
    alg = make_trainer(kind, sharded, opt, granularity)
    assert alg.manager.sharded and not ref_alg.manager.sharded
    for name in ref_alg.manager.layers:
        assert torch.equal(full_masks(alg.manager)[name], ref_alg.manager.layers[name].mask), f"{name}: initial mask"
    initial = {n: m.clone() for n, m in full_masks(alg.manager).items()}
    train(ref, ref_opt, ref_alg, range(1, 9), sharded=False)
    train(sharded, opt, alg, range(1, 9), sharded=True, accumulate=accumulate,
          check=lambda: assert_exact_zeros(alg.manager, grads=True))
    final = full_masks(alg.manager)
    for name, layer in ref_alg.manager.layers.items():
        assert torch.equal(final[name], layer.mask), f"{kind}/{granularity}: {name} differs from the single-process run"
    assert any(not torch.equal(final[n], initial[n]) for n in final), "the masks never changed"
    assert len(alg.history) == 4 == len(ref_alg.history)
    assert [h["regrown_weights"] for h in alg.history] == [h["regrown_weights"] for h in ref_alg.history]
    assert sum(sum(h["dropped_units"].values()) for h in alg.history) > 0, "no unit was ever dropped"
    assert alg.history[0]["sparsity"] == ref_alg.history[0]["sparsity"]
    assert_exact_zeros(alg.manager)
    return alg.history[-1]["comm"]


def scenario_lottery_matches_single_process(scope: str, granularity: str) -> None:
    from sparsevit.sparse_training import LotteryTicket

    block = 16 if granularity == "block" else None
    ref = MLP(seed=1)
    sharded = shard_model(copy.deepcopy(ref))
    tickets = [LotteryTicket(m, 0.3, scope=scope, granularity=granularity, block_size=block) for m in (ref, sharded)]
    for r in range(3):
        for model, ticket, is_sharded in ((ref, tickets[0], False), (sharded, tickets[1], True)):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            ticket.attach(opt)
            train(model, opt, _NoStep(), range(1 + 10 * r, 4 + 10 * r), sharded=is_sharded)
            ticket.prune()
            ticket.rewind()
        for name, layer in tickets[0].manager.layers.items():
            assert torch.equal(full_masks(tickets[1].manager)[name], layer.mask), f"IMP {scope}: {name} round {r}"
        assert tickets[1].manager.total_sparsity() == tickets[0].manager.total_sparsity()
        assert_exact_zeros(tickets[1].manager)
    tickets[1].random_reinit(seed=5)
    tickets[0].random_reinit(seed=5)
    assert_exact_zeros(tickets[1].manager)
    for name, layer in tickets[0].manager.layers.items():
        whole = tickets[1].manager.layers[name].weight.full_tensor()
        torch.testing.assert_close(whole, layer.weight.detach(), rtol=1e-5, atol=1e-6)


class _NoStep:
    def step(self) -> bool:
        return False


def scenario_checkpoint_resume(tmp: str) -> None:
    """DCP save on 2 ranks → fresh model, optimizer and trainer → load → the same run as without the break."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from sparsevit.sparse_training import load_distributed_checkpoint, save_distributed_checkpoint

    def fresh():
        model = shard_model(MLP(seed=2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, make_trainer("rigl", model, opt, "block")

    model, opt, alg = fresh()
    train(model, opt, alg, range(1, 10), sharded=True)
    straight = (full_masks(alg.manager), {k: v.full_tensor() for k, v in model.state_dict().items()}, alg.t)

    model, opt, alg = fresh()
    train(model, opt, alg, range(1, 5), sharded=True)
    model_sd, opt_sd = get_state_dict(model, opt)
    save_distributed_checkpoint(tmp, alg, {"model": model_sd, "optim": opt_sd})

    model, opt, alg = fresh()
    model_sd, opt_sd = get_state_dict(model, opt)
    extra = {"model": model_sd, "optim": opt_sd}
    load_distributed_checkpoint(tmp, alg, extra)
    set_state_dict(model, opt, model_state_dict=extra["model"], optim_state_dict=extra["optim"])
    assert alg.t == 4
    train(model, opt, alg, range(5, 10), sharded=True)
    assert alg.t == straight[2]
    for name, m in full_masks(alg.manager).items():
        assert torch.equal(m, straight[0][name]), f"resumed masks differ: {name}"
    for k, v in model.state_dict().items():
        assert torch.equal(v.full_tensor(), straight[1][k]), f"resumed weights differ: {k}"

    # A checkpoint of another configuration is refused, and nothing changes.
    other = shard_model(MLP(seed=2))
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-2)
    elem = make_trainer("rigl", other, other_opt, "element")
    before = (full_masks(elem.manager), elem.t, elem.manager.generator.get_state().clone())
    try:
        load_distributed_checkpoint(tmp, elem)
    except ValueError as err:
        assert "granularity" in str(err) or "does not fit" in str(err), str(err)
    else:
        raise AssertionError("a block-granularity checkpoint loaded into an element-granularity trainer")
    after = full_masks(elem.manager)
    assert all(torch.equal(after[n], before[0][n]) for n in after) and elem.t == before[1]
    assert torch.equal(elem.manager.generator.get_state(), before[2])

    bigger = nn.Module()
    bigger.fc1 = nn.Linear(32, 64)
    bigger.extra = nn.Linear(32, 64)
    shard_model_layers(bigger, ("fc1", "extra"))
    bigger_opt = torch.optim.SGD(bigger.parameters(), lr=0.1)
    wrong = make_trainer("rigl", bigger, bigger_opt, "block")
    try:
        load_distributed_checkpoint(tmp, wrong)
    except ValueError as err:
        assert tmp in str(err), str(err)
    else:
        raise AssertionError("a checkpoint of other layers loaded")


def shard_model_layers(model: nn.Module, names) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for name in names:
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)


def scenario_ticket_file(tmp: str) -> None:
    """save_ticket from a sharded run writes the ticket the unsharded run writes; apply_ticket on a sharded model."""
    from sparsevit.sparse_training import RigL, load_ticket, save_ticket

    ref = MLP(seed=4)
    sharded = shard_model(copy.deepcopy(ref))
    algs = []
    for model, is_sharded in ((ref, False), (sharded, True)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        alg = RigL(model, opt, 0.5, delta_t=2, t_end=9, granularity="block", block_size=16, seed=1)
        train(model, opt, alg, range(1, 5), sharded=is_sharded)
        algs.append(alg)
    path_sharded, path_ref = f"{tmp}/sharded.ticket", f"{tmp}/ref.ticket"
    save_ticket(path_sharded, algs[1])
    if dist.get_rank() == 0:
        save_ticket(path_ref, algs[0])
    dist.barrier()
    # Same masks, checksum and metadata (safetensors orders its metadata at random, so not the same bytes).
    (ma, meta_a), (mb, meta_b) = load_ticket(path_sharded), load_ticket(path_ref)
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[n], mb[n]) for n in ma), "ticket masks differ"
    assert meta_a == meta_b, f"ticket metadata differs: {meta_a} vs {meta_b}"
    fresh = shard_model(MLP(seed=9))
    manager = load_ticket(fresh, path_sharded)
    assert manager.sharded
    masks, _ = load_ticket(path_sharded)
    for name, layer in manager.layers.items():
        assert torch.equal(layer.full_mask(), masks[name])
    assert_exact_zeros(manager)
    try:
        from sparsevit.sparse_training import to_block_sparse

        to_block_sparse(fresh, manager)
    except ValueError as err:
        assert "FSDP2" in str(err) and "load_ticket" in str(err)
    else:
        raise AssertionError("to_block_sparse accepted sharded weights")


def scenario_uneven_rows() -> None:
    """3 rows over 2 ranks (2 + 1) and 1 row (1 + 0): masks still match the single-process run."""
    from sparsevit.sparse_training import RigL

    for rows in (3, 1):
        ref = MLP(rows=rows, seed=rows)
        sharded = shard_model(copy.deepcopy(ref))
        algs = []
        for model, is_sharded in ((ref, False), (sharded, True)):
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            alg = RigL(model, opt, 0.7, delta_t=1, t_end=5, seed=2, filter=lambda n, m: n in ("fc2", "fc3"))
            train(model, opt, alg, range(1, 5), sharded=is_sharded)
            algs.append(alg)
        local = algs[1].manager.layers["fc2"].local_mask
        expected_rows = (rows + 1) // 2 if dist.get_rank() == 0 else rows - (rows + 1) // 2
        assert local.shape[0] == expected_rows, (rows, dist.get_rank(), tuple(local.shape))
        for name, layer in algs[0].manager.layers.items():
            assert torch.equal(algs[1].manager.layers[name].full_mask(), layer.mask), f"rows={rows}: {name}"


def scenario_block_misaligned() -> None:
    """A shard boundary inside a block is refused, naming the layer and the sizes."""
    from sparsevit.sparse_training import RigL

    model = shard_model(MLP(rows=96))  # fc2: 96 rows → 48 per rank, not a multiple of 32
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        RigL(model, opt, 0.5, t_end=10, granularity="block", block_size=32)
    except ValueError as err:
        assert "fc2" in str(err) and "48" in str(err) and "split" in str(err), str(err)
    else:
        raise AssertionError("a block split across shards was accepted")


def scenario_refusals() -> None:
    """Unsupported layouts and orders fail with errors that say what to do."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    from sparsevit.sparse_training import MaskManager, RigL, train_block_sparse

    # The manager must come after fully_shard: the old plain parameters are gone afterwards.
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    alg = RigL(model, opt, 0.5, t_end=10)
    shard_model(model)
    try:
        alg.manager.apply_masks()
    except RuntimeError as err:
        assert "after fully_shard" in str(err), str(err)
    else:
        raise AssertionError("a manager built before fully_shard kept running on stale parameters")

    # A replicated DTensor (not FSDP2's Shard(0)) is refused by type.
    mesh = init_device_mesh("cpu", (WORLD,))
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Replicate()]))
    holder = nn.Module()
    holder.fc = layer
    try:
        MaskManager(holder, 0.5, filter=lambda name, module: name == "fc")
    except TypeError as err:
        assert "Shard(0)" in str(err) and "fc" in str(err), str(err)
    else:
        raise AssertionError("a replicated DTensor weight was accepted")

    sharded = shard_model(MLP())
    manager = MaskManager(sharded, 0.5, granularity="block", block_size=16)
    try:
        train_block_sparse(manager)
    except ValueError as err:
        assert "FSDP2" in str(err), str(err)
    else:
        raise AssertionError("train_block_sparse accepted sharded weights")


def scenario_supermask() -> None:
    """edge-popup converted before fully_shard: the same masks as one process after training the scores."""
    from sparsevit.sparse_training import convert_to_supermask, supermask_layers

    ref = convert_to_supermask(MLP(seed=6), 0.6, granularity="block", block_size=16, seed=2)
    sharded = shard_model(copy.deepcopy(ref))
    initial = {n: layer.unit_mask() for n, layer in supermask_layers(ref).items()}
    for model, is_sharded in ((ref, False), (sharded, True)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
        train(model, opt, _NoStep(), range(1, 4), sharded=is_sharded)
    ref_layers, sh_layers = supermask_layers(ref), supermask_layers(sharded)
    assert ref_layers and set(ref_layers) == set(sh_layers)
    changed = False
    for name, layer in ref_layers.items():
        got = sh_layers[name].unit_mask()
        assert torch.equal(got, layer.unit_mask()), f"supermask {name} differs from the single-process run"
        assert int(got.sum()) == layer.k
        changed |= not torch.equal(got, initial[name])
    assert changed, "training the scores never changed a supermask"
