"""RigL on a timm ViT sharded with FSDP2 (``fully_shard``): masks sharded like the weights.

CPU (gloo), 2 processes::

    torchrun --nproc_per_node 2 examples/fsdp2_rigl.py

GPUs (NCCL, one process per GPU)::

    torchrun --nproc_per_node 8 examples/fsdp2_rigl.py --steps 1000

Trains on random data (the point is the mechanics), saves a DCP checkpoint with the
model, optimizer and RigL state, resumes from it, and writes the ticket (one file,
from rank 0) that ``load_ticket(model, path)`` applies to an unsharded model.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sparsevit.sparse_training import RigL, load_distributed_checkpoint, save_distributed_checkpoint, save_ticket


def build(device: torch.device, mesh) -> tuple[nn.Module, torch.optim.Optimizer, RigL]:
    """Model → fully_shard (every block, then the root) → optimizer → RigL, in that order."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rigl = RigL(model, optimizer, sparsity=0.8, delta_t=5, t_end=30, granularity="block", block_size=16)
    return model, optimizer, rigl


def train(model, optimizer, rigl, steps: range, device: torch.device, rank: int) -> None:
    for t in steps:
        g = torch.Generator().manual_seed(1000 * t + rank)  # each rank its own part of the global batch
        x, y = torch.randn(8, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if rigl.step() and rank == 0:
            record = rigl.history[-1]
            print(f"step {t}: sparsity {record['sparsity']:.3f}, {record['regrown_weights']} weights regrown, "
                  f"{record['comm']['calls']} collectives / {record['comm']['bytes_sent']} bytes sent by this rank")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="directory for the checkpoint and the ticket (default: a temp dir)")
    parser.add_argument("--comm-json", default=None, help="write every mask update's record (with its comm) here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    out = args.out or (tempfile.mkdtemp() if rank == 0 else None)
    box = [out]
    dist.broadcast_object_list(box, src=0)
    out = box[0]

    model, optimizer, rigl = build(device, mesh)
    half = args.steps // 2
    train(model, optimizer, rigl, range(1, half + 1), device, rank)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    save_distributed_checkpoint(os.path.join(out, "checkpoint"), rigl, {"model": model_sd, "optim": optim_sd})

    model, optimizer, rigl = build(device, mesh)  # a fresh start, as after a restart
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    load_distributed_checkpoint(os.path.join(out, "checkpoint"), rigl, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, optimizer, rigl, range(half + 1, args.steps + 1), device, rank)

    ticket = os.path.join(out, "rigl.ticket")
    save_ticket(ticket, rigl)  # every rank calls; rank 0 writes one file
    sparsity = rigl.manager.total_sparsity()  # a collective under FSDP2: every rank calls it
    if rank == 0 and args.comm_json:
        import json

        with open(args.comm_json, "w") as fh:
            json.dump({"command": "torchrun --nproc_per_node 2 examples/fsdp2_rigl.py --comm-json PATH",
                       "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                       "layers": len(rigl.manager.layers), "granularity": "block", "block_size": 16,
                       "sparsity": 0.8, "updates": rigl.history}, fh, indent=1)
    if rank == 0:
        print(f"resumed at step {half}, finished at step {rigl.t}, sparsity {sparsity:.3f}; ticket {ticket}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
