"""Suite ``vit_blocksparse``: a whole timm ViT with block-sparse Linears against the same dense ViT.

Random weights (no download), inference images/s and a training step (forward,
backward, AdamW step), timed in interleaved rounds with a synchronise per call
(:func:`sparsevit.cli.timing.measure_interleaved`) so every contender sees the same
machine state.  Contenders, each against the dense model in the same run:

* every Linear of every block block-sparse (attention ``qkv`` and ``proj``, MLP
  ``fc1`` and ``fc2``; patch embedding and head dense) at 90% and 75% of the blocks
  dropped, block 32 and 64 (:func:`sparsevit.nn.sparsify_linears`, the largest-norm
  blocks kept, on the backend chosen for the device: ``cpp`` on the CPU);
* inference only: DynamicViT (ρ = 0.7, physical token dropping) alone, and DynamicViT
  with 90% block-sparse MLPs (block 64).

Every sparse model is checked against its dense twin (the same ViT with the dropped
blocks zeroed, a dense ``nn.Linear`` each) before it is timed; DynamicViT at ρ = 1
against the dense ViT.  CPU: ``vit_small_patch16_224`` (ViT-S/16), float32, batch 16
(inference and training); ``--quick``: deit_tiny, batch 4.  GPU: ViT-S/16, bfloat16,
batch 256 inference and 64 training.  No ``torch.compile``.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

from sparsevit.cli.bench_cases import masked_dense
from sparsevit.cli.timing import measure_interleaved
from sparsevit.models import DynamicViT
from sparsevit.nn import BlockSparseLinear, sparsify_linears

from harness import Progress, Record, Runner, TimedMs

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
MLP_LINEARS = ("mlp.fc1", "mlp.fc2")
SETTINGS = ((0.9, 64), (0.9, 32), (0.75, 64), (0.75, 32))  # (sparsity, block) with every block Linear sparse
KEEP_RATIO = 0.7


def _plan(runner: Runner) -> dict:
    if runner.device.type == "cuda":
        return dict(model="vit_small_patch16_224", batch=256, train_batch=64, rounds=20, budget_s=20.0)
    if runner.quick:
        return dict(model="deit_tiny_patch16_224", batch=4, train_batch=4, rounds=3, budget_s=5.0)
    return dict(model="vit_small_patch16_224", batch=16, train_batch=16, rounds=5, budget_s=60.0)


def _sparsify(model: nn.Module, sparsity: float, block: int, which: tuple) -> list[str]:
    """Make the named Linears of every block block-sparse in place (largest L2 blocks kept); the converted names."""
    def wanted(name: str, module: nn.Module) -> bool:
        return name.startswith("blocks.") and name.split(".", 2)[-1] in which

    expected = sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear) and wanted(name, m))
    report = sparsify_linears(model, block_size=block, sparsity=sparsity, filter=wanted)
    if not expected or sorted(report.converted) != expected:
        raise RuntimeError(f"vit_blocksparse: not every wanted Linear was converted: {report}")
    return list(report.converted)


def _dense_twin(model: nn.Module) -> nn.Module:
    """A copy with every BlockSparseLinear as the dense Linear of its kept blocks (the reference)."""
    return masked_dense(model)


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got − ref| / max|ref|`` (random-weight logits are small: an absolute floor would hide errors)."""
    ref = ref.detach().double()
    return float((got.detach().double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


def _check(name: str, model: nn.Module, twin: nn.Module, images: torch.Tensor, tol: float) -> float:
    with torch.inference_mode():
        err = _rel_error(model(images), twin(images))
    if not err <= tol:
        raise AssertionError(f"vit_blocksparse: {name} differs from its dense twin by {err:.3g} > {tol:g}; refusing to time it")
    return err


def _inference(model: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return model(images)

    return call


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _images(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen).to(device, dtype)


def _backend(model: nn.Module, device: torch.device) -> str:
    from sparsevit.backend import choose_backend
    from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT

    layer = next(m for m in model.modules() if isinstance(m, BlockSparseLinear))
    values = next(layer.parameters())
    return choose_backend(BLOCK_SPARSE_SUPPORT, [torch.zeros(1, layer.in_features, device=device, dtype=values.dtype), values])


def run(runner: Runner) -> None:
    plan = _plan(runner)
    dev, dtype = runner.device, runner.dtypes[0]
    dt = str(dtype).replace("torch.", "")
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    bar = Progress(3, "vit_blocksparse")
    torch.manual_seed(0)
    dense = timm.create_model(plan["model"], pretrained=False).to(dev, dtype).eval()
    check_images = _images(dense, 2, dev, dtype, seed=3)

    sparse: dict[str, tuple[nn.Module, dict]] = {}
    for sparsity, block in SETTINGS:
        model = copy.deepcopy(dense)
        converted = _sparsify(model, sparsity, block, BLOCK_LINEARS)
        model = model.to(dev, dtype).eval()
        name = f"all block Linears {round(100 * sparsity)}% sparse, block {block} ({_backend(model, dev)})"
        err = _check(name, model, _dense_twin(model).eval(), check_images, tol)
        sparse[name] = (model, {"sparsity": sparsity, "block": block, "linears": list(BLOCK_LINEARS),
                                "converted": len(converted), "max_rel_error": err})

    dvit = DynamicViT(copy.deepcopy(dense), keep_ratio=KEEP_RATIO).to(dev, dtype).eval()
    full = DynamicViT(copy.deepcopy(dense), keep_ratio=1.0).to(dev, dtype).eval()
    dvit_err = _check("DynamicViT at keep_ratio=1", full, dense, check_images, tol)
    dvit_sparse = copy.deepcopy(dvit)
    converted = _sparsify(dvit_sparse.vit, 0.9, 64, MLP_LINEARS)
    dvit_sparse = dvit_sparse.to(dev, dtype).eval()
    dvs_name = f"DynamicViT rho={KEEP_RATIO} + MLPs 90% sparse, block 64 ({_backend(dvit_sparse, dev)})"
    dvs_err = _check(dvs_name, dvit_sparse, _dense_twin(dvit_sparse).eval(), check_images, tol)
    bar.advance("models built and checked")

    shape = {"model": plan["model"], "batch": plan["batch"], "img": dense.patch_embed.img_size[0], "torch_compile": False}
    images = _images(dense, plan["batch"], dev, dtype)
    fns = {"dense ViT": _inference(dense, images)}
    fns.update({name: _inference(model, images) for name, (model, _) in sparse.items()})
    fns[f"DynamicViT rho={KEEP_RATIO}"] = _inference(dvit, images)
    fns[dvs_name] = _inference(dvit_sparse, images)
    timings = measure_interleaved(fns, dev, min_rounds=plan["rounds"], budget_s=plan["budget_s"])
    extras = {name: info for name, (_, info) in sparse.items()}
    extras[f"DynamicViT rho={KEEP_RATIO}"] = {"keep_ratio": KEEP_RATIO, "max_rel_error": dvit_err, "checked_at": "keep_ratio=1"}
    extras[dvs_name] = {"keep_ratio": KEEP_RATIO, "sparsity": 0.9, "block": 64, "linears": list(MLP_LINEARS),
                        "converted": len(converted), "max_rel_error": dvs_err}
    _add(runner, "inference", timings, shape, dt, plan["batch"], extras)
    bar.advance("inference timed")

    shape = dict(shape, batch=plan["train_batch"])
    images = _images(dense, plan["train_batch"], dev, dtype)
    labels = torch.randint(0, dense.num_classes, (plan["train_batch"],), generator=torch.Generator().manual_seed(2)).to(dev)
    steps = {"dense ViT": _train_step(copy.deepcopy(dense).train(), images, labels)}
    steps.update({name: _train_step(copy.deepcopy(model).train(), images, labels) for name, (model, _) in sparse.items()})
    timings = measure_interleaved(steps, dev, min_rounds=plan["rounds"], budget_s=plan["budget_s"])
    _add(runner, "train step", timings, shape, dt, plan["train_batch"], extras)
    bar.advance("training step timed")


def _add(runner: Runner, op: str, timings: dict, shape: dict, dt: str, batch: int, extras: dict) -> None:
    base = timings["dense ViT"]
    runner.add(Record("vit_blocksparse", op, "dense ViT", None, None, dt, shape, TimedMs(base),
                      extra={"img_per_s": batch / (base.median * 1e-3)}))
    for name, timing in timings.items():
        if name == "dense ViT":
            continue
        backend: Optional[str] = name.rsplit("(", 1)[-1].rstrip(")") if name.endswith(")") else None
        runner.add(Record("vit_blocksparse", op, name, backend, "dense ViT", dt, shape, TimedMs(timing),
                          speedup_vs_baseline=base.median / timing.median,
                          extra=dict(extras.get(name, {}), img_per_s=batch / (timing.median * 1e-3))))


def format_records(records: list) -> str:
    """One line per contender: images/s, median ms [interquartile range], speed-up over dense."""
    lines = [f"{'mode':<11} {'contender':<72} {'img/s':>8} {'ms [IQR]':>24} {'vs dense':>9}", "-" * 128]
    for r in records:
        s = r.spread or {}
        iqr = f"[{s.get('q1_ms', float('nan')):.1f}-{s.get('q3_ms', float('nan')):.1f}]"
        ratio = "" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x"
        lines.append(f"{r.op:<11} {r.impl:<72} {r.extra['img_per_s']:>8.1f} {r.median_ms:>10.1f} {iqr:>13} {ratio:>9}")
    return "\n".join(lines)
