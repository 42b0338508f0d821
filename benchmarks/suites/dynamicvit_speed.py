"""Suite ``dynamicvit_speed``: model-level speed of DynamicViT against dense timm ViTs.

Random weights, inference mode, warm-up, then the median time of a batch:

* inference: dense timm model (its own fused attention, SDPA: the honest baseline)
  vs DynamicViT at ρ ∈ {0.5, 0.7, 0.9} with physical token dropping, img/s and ratio;
* training step (forward + backward + optimizer step) of DynamicViT with the attention
  masking on each available backend of ``masked_attention``: ``torch`` is the unfused
  DynamicViT formula (an N×N matrix in HBM), ``triton``/``cuda`` the fused kernels;
  with peak memory on a GPU.

GPU: bf16, batch 1/64/256, deit_tiny/small/base and vit_base_patch16_384.
CPU: float32, deit_tiny/small at batch 1 and 16 (``--quick``: deit_tiny only).
"""

from __future__ import annotations

import os

import timm
import torch

from sparsevit.models import DynamicViT, DynamicViTLoss
from sparsevit.ops.masked_attention import MASKED_ATTENTION_SUPPORT

from harness import Progress, Record, Runner, time_ms

RATIOS = (0.5, 0.7, 0.9)


def _plan(runner: Runner) -> tuple[list[str], list[int], int]:
    if runner.device.type == "cuda":
        models = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_base_patch16_384"]
        return (models[:2] if runner.quick else models), [1, 64, 256], 64
    return (["deit_tiny_patch16_224"] if runner.quick else ["deit_tiny_patch16_224", "deit_small_patch16_224"]), [1, 16], 8


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def run(runner: Runner) -> None:
    dtype = runner.dtypes[0]
    dt = str(dtype).replace("torch.", "")
    names, batches, train_batch = _plan(runner)
    points = [(n, b) for n in names for b in batches]
    bar = Progress(len(points) + len(names), "dynamicvit_speed")
    for name, batch in points:
        torch.manual_seed(0)
        dense = timm.create_model(name, pretrained=False).to(runner.device, dtype).eval()
        size = dense.patch_embed.img_size
        images = torch.randn(batch, 3, *size, device=runner.device, dtype=dtype)
        shape = {"model": name, "batch": batch, "img": size[0]}
        with torch.no_grad():
            dense_ms = time_ms(lambda: dense(images), runner.device, min_time_s=1.0)
        runner.add(Record("dynamicvit_speed", "inference", "timm dense (fused attention)", None, None, dt, shape, dense_ms,
                          extra={"img_per_s": batch / (dense_ms * 1e-3), "fused_attn": bool(dense.blocks[0].attn.fused_attn)}))
        for rho in RATIOS:
            model = DynamicViT(timm.create_model(name, pretrained=False), keep_ratio=rho).to(runner.device, dtype).eval()
            with torch.no_grad():
                ms = time_ms(lambda: model(images), runner.device, min_time_s=1.0)
            runner.add(Record("dynamicvit_speed", "inference", f"dynamicvit rho={rho}", None, "timm dense", dt, shape, ms,
                              speedup_vs_baseline=dense_ms / ms, extra={"img_per_s": batch / (ms * 1e-3)}))
        bar.advance(f"{name} batch {batch} inference")
    for name in names:
        _training_step(runner, name, train_batch, dtype, dt)
        bar.advance(f"{name} batch {train_batch} train step")


def _training_backends(runner: Runner, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """Backends of masked_attention to time a training step with (torch, the baseline, first)."""
    q = torch.zeros(1, 1, 4, 8, device=runner.device, dtype=dtype)
    backends, skipped = runner.split_backends(MASKED_ATTENTION_SUPPORT, [q, q, q])
    if runner.device.type == "cpu":
        for backend in [b for b in backends if b != "torch"]:
            backends.remove(backend)
            skipped[backend] = "on the CPU only the torch backend is a speed path (the Triton interpreter is for tests)"
    return sorted(backends, key=lambda b: b != "torch"), skipped


def _training_step(runner: Runner, name: str, batch: int, dtype: torch.dtype, dt: str) -> None:
    backends, skipped = _training_backends(runner, dtype)
    for backend, reason in skipped.items():
        runner.skip("train_step", f"dynamicvit rho=0.7 attention[{backend}]", backend, dt, {"model": name, "batch": batch},
                    reason, "unfused formula (torch)")
    results = {}
    for backend in backends:
        torch.manual_seed(0)
        model = DynamicViT(timm.create_model(name, pretrained=False), keep_ratio=0.7).to(runner.device, dtype).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = DynamicViTLoss()
        size = model.vit.patch_embed.img_size
        images = torch.randn(batch, 3, *size, device=runner.device, dtype=dtype)
        labels = torch.randint(0, 1000, (batch,), device=runner.device)

        def step():
            loss = loss_fn(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        os.environ["SPARSEVIT_BACKEND"] = backend
        try:
            if runner.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(runner.device)
            ms = time_ms(step, runner.device, min_time_s=1.0)
            peak = _peak_mb(runner.device)
        finally:
            os.environ.pop("SPARSEVIT_BACKEND", None)
        results[backend] = ms
        base = results.get("torch")
        runner.add(Record("dynamicvit_speed", "train_step", f"dynamicvit rho=0.7 attention[{backend}]", backend,
                          None if backend == "torch" else "unfused formula (torch)", dt, {"model": name, "batch": batch},
                          ms, speedup_vs_baseline=None if base is None or backend == "torch" else base / ms,
                          extra={"peak_memory_mb": peak, "img_per_s": batch / (ms * 1e-3)}))
