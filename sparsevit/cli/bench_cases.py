"""The three comparisons of ``python -m sparsevit bench``, each against its dense baseline.

(a) a timm ViT whose MLPs are block-sparse (:func:`sparsevit.nn.sparsify_linears` on
    every ``blocks[i].mlp``: 90% of the 64×64 blocks dropped) against the same dense
    ViT: inference images/s and a training step (forward, backward, AdamW step);
(b) DynamicViT (:class:`sparsevit.models.DynamicViT`, ρ = 0.7, physical token
    dropping) against the dense ViT, inference;
(c) on a GPU, the fused masked attention (:func:`sparsevit.masked_attention`, Triton,
    70% of the keys kept) against dense attention (PyTorch SDPA, no mask) and the
    unfused masked formula; forward and forward+backward.

Random weights and inputs (no download).  Every contender is checked before it is
timed: the sparse ViT against the dense ViT with the same blocks zeroed, DynamicViT
at ρ = 1 against the dense ViT, the attention against the float32 reference.  Model
steps are timed in interleaved rounds with a synchronise per step
(:func:`sparsevit.cli.timing.measure_interleaved`); kernels with
``triton.testing.do_bench``.  No ``torch.compile``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .progress import Progress
from .timing import Timing, measure, measure_interleaved, ratio_range

__all__ = ["TINY", "Plan", "Row", "plan_for", "run_attention", "run_models"]

TINY = "tiny"  # a 2-block ViT on 32x32 images: the test size


@dataclass(frozen=True)
class Plan:
    """What one run measures: the model, batch sizes, dtype, timing budgets, attention shapes."""

    model: str
    batch: int
    train_batch: int
    dtype: torch.dtype
    infer_rounds: int
    infer_budget_s: float
    train_rounds: int
    train_budget_s: float
    attention: tuple = ()  # (B, H, N, D) points, GPU only
    sparsity: float = 0.9
    block: int = 64
    keep_ratio: float = 0.7
    attention_keep: float = 0.7


def plan_for(device: torch.device, quick: bool, tiny: bool = False) -> Plan:
    """The plan for ``device``: minutes on a GPU, ~1-2 minutes (``quick``) on a 2-thread CPU."""
    if tiny:
        return Plan(TINY, 2, 2, torch.float32 if device.type == "cpu" else torch.bfloat16, 2, 0.0, 2, 0.0,
                    attention=((1, 2, 17, 32),), sparsity=0.9, block=64)
    if device.type == "cuda":
        if quick:
            return Plan("deit_small_patch16_224", 64, 64, torch.bfloat16, 40, 5.0, 20, 5.0, attention=((64, 6, 197, 64),))
        return Plan("deit_base_patch16_224", 256, 64, torch.bfloat16, 50, 20.0, 30, 20.0,
                    attention=((256, 6, 197, 64), (64, 12, 577, 64)))
    if quick:
        return Plan("deit_tiny_patch16_224", 8, 8, torch.float32, 5, 15.0, 3, 15.0)
    return Plan("deit_small_patch16_224", 8, 8, torch.float32, 10, 60.0, 5, 60.0)


@dataclass
class Row:
    """One line of the table: a contender, its timing, and its ratio to the baseline."""

    part: str
    mode: str
    impl: str
    baseline: Optional[str]
    setting: dict
    timing: Optional[Timing] = None
    items: Optional[int] = None  # images per call (img/s); None for kernels
    flops: Optional[float] = None
    speedup: Optional[float] = None
    speedup_range: Optional[tuple] = None
    check: Optional[dict] = None
    skipped: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def img_per_s(self) -> Optional[float]:
        if self.timing is None or self.items is None:
            return None
        return self.items / (self.timing.median * 1e-3)

    @property
    def tflops(self) -> Optional[float]:
        if self.timing is None or self.flops is None:
            return None
        return self.flops / (self.timing.median * 1e-3) / 1e12

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "timing"}
        out["timing"] = None if self.timing is None else self.timing.as_dict()
        out["median_ms"] = None if self.timing is None else self.timing.median
        out["img_per_s"], out["tflops"] = self.img_per_s, self.tflops
        return out


def _against(rows: list[Row], baseline: Row) -> None:
    for row in rows:
        if row.timing is not None and baseline.timing is not None:
            row.speedup = baseline.timing.median / row.timing.median
            row.speedup_range = ratio_range(baseline.timing, row.timing)


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|got − ref| / max|ref|``: relative to the output's own scale (the logits of a
    randomly initialised ViT are far below 1, so an absolute floor would hide errors)."""
    ref = ref.detach().double()
    return float((got.detach().double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


def _tolerance(dtype: torch.dtype) -> float:
    """Model outputs after a dozen blocks: float32 summation order, or half-precision rounding."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def build_vit(plan: Plan) -> nn.Module:
    """The dense ViT of the plan, random weights (seed 0)."""
    torch.manual_seed(0)
    if plan.model == TINY:
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=10)
    import timm

    return timm.create_model(plan.model, pretrained=False)


def sparsify_mlps(model: nn.Module, plan: Plan) -> list[str]:
    """Make every ``blocks[i].mlp`` Linear block-sparse in place; the converted names.

    Raises RuntimeError naming the layers that could not be converted (and why).
    """
    from ..nn import sparsify_linears

    converted = []
    for i, blk in enumerate(model.blocks):
        report = sparsify_linears(blk.mlp, block_size=plan.block, sparsity=plan.sparsity)
        if report.skipped:
            raise RuntimeError(f"blocks.{i}.mlp: not converted: {report.skipped}")
        converted += [f"blocks.{i}.mlp.{name}" for name in report.converted]
    return converted


def masked_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BlockSparseLinear as the dense Linear of its kept blocks."""
    from ..nn import BlockSparseLinear

    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BlockSparseLinear):
                setattr(parent, name, child.to_dense())
    return out


def _block_sparse_backend(model: nn.Module, device: torch.device) -> str:
    from ..backend import choose_backend
    from ..nn import BlockSparseLinear
    from ..ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT

    layer = next(m for m in model.modules() if isinstance(m, BlockSparseLinear))
    values = next(layer.parameters())
    x = torch.zeros(1, layer.in_features, device=device, dtype=values.dtype)
    return choose_backend(BLOCK_SPARSE_SUPPORT, [x, values])


def _inference(model: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    def call():
        with torch.inference_mode():
            return model(images)

    return call


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _images(plan: Plan, model: nn.Module, batch: int, device: torch.device) -> torch.Tensor:
    size = model.patch_embed.img_size
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, *size, generator=gen).to(device, plan.dtype)


def _checks(plan: Plan, dense: nn.Module, sparse: nn.Module, device: torch.device) -> dict:
    """Correct before fast: the sparse ViT vs its masked dense twin, DynamicViT(ρ=1) vs the dense ViT."""
    from ..models import DynamicViT

    images = _images(plan, dense, 2, device)
    tol = _tolerance(plan.dtype)
    with torch.inference_mode():
        twin = masked_dense(sparse).eval()
        sparse_err = _rel_error(sparse(images), twin(images))
        full = DynamicViT(copy.deepcopy(dense), keep_ratio=1.0).to(device, plan.dtype).eval()
        dvit_err = _rel_error(full(images), dense(images))
    return {
        "sparse": {"against": "dense ViT with the same blocks zeroed", "max_rel_error": sparse_err,
                   "tolerance": tol, "ok": sparse_err <= tol},
        "dynamicvit": {"against": "dense ViT (DynamicViT at keep_ratio=1 on its weights)", "max_rel_error": dvit_err,
                       "tolerance": tol, "ok": dvit_err <= tol},
    }


def run_models(plan: Plan, device: torch.device, bar: Progress) -> list[Row]:
    """Parts (a) and (b): build, check, then time inference (3 contenders) and a training step (2)."""
    from ..models import DynamicViT

    dense = build_vit(plan).to(device, plan.dtype).eval()
    sparse = copy.deepcopy(dense)
    converted = sparsify_mlps(sparse, plan)
    sparse = sparse.to(device, plan.dtype).eval()
    dvit = DynamicViT(copy.deepcopy(dense), keep_ratio=plan.keep_ratio).to(device, plan.dtype).eval()
    checks = _checks(plan, dense, sparse, device)
    dt = str(plan.dtype).replace("torch.", "")
    backend = _block_sparse_backend(sparse, device)
    fused = bool(getattr(dense.blocks[0].attn, "fused_attn", False))
    setting = {"model": plan.model, "batch": plan.batch, "dtype": dt, "timm_attention": "SDPA" if fused else "unfused",
               "torch_compile": False}
    sparse_name = f"block-sparse MLPs ({round(100 * plan.sparsity)}%, block {plan.block}, {backend})"
    dvit_name = f"DynamicViT rho={plan.keep_ratio}"
    with torch.inference_mode():
        _, kept = dvit(_images(plan, dense, 1, device), return_index=True)
    tokens = [int(k.shape[1]) for k in kept]
    bar.advance("models built and checked")

    rows = []
    images = _images(plan, dense, plan.batch, device)
    ok = {"dense ViT": True, sparse_name: checks["sparse"]["ok"], dvit_name: checks["dynamicvit"]["ok"]}
    fns = {"dense ViT": _inference(dense, images)}
    if ok[sparse_name]:
        fns[sparse_name] = _inference(sparse, images)
    if ok[dvit_name]:
        fns[dvit_name] = _inference(dvit, images)
    timings = measure_interleaved(fns, device, min_rounds=plan.infer_rounds, budget_s=plan.infer_budget_s)
    base = Row("dense ViT", "inference", "dense ViT", None, setting, timings["dense ViT"], plan.batch)
    sp = Row("block-sparse MLP", "inference", sparse_name, "dense ViT", setting, timings.get(sparse_name), plan.batch,
             check=checks["sparse"], extra={"converted": converted})
    dv = Row("DynamicViT", "inference", dvit_name, "dense ViT", setting, timings.get(dvit_name), plan.batch,
             check=checks["dynamicvit"], extra={"tokens_per_stage": tokens, "prune_at": dvit.prune_at})
    for row in (sp, dv):
        if not row.check["ok"]:
            row.skipped = f"wrong result, not timed: error {row.check['max_rel_error']:.3g} > {row.check['tolerance']:.0e}"
    _against([sp, dv], base)
    rows += [base, sp, dv]
    bar.advance("inference timed")

    train_setting = dict(setting, batch=plan.train_batch)
    images = _images(plan, dense, plan.train_batch, device)
    labels = torch.randint(0, dense.num_classes, (plan.train_batch,), generator=torch.Generator().manual_seed(2)).to(device)
    steps = {"dense ViT": _train_step(copy.deepcopy(dense).train(), images, labels)}
    if ok[sparse_name]:
        steps[sparse_name] = _train_step(copy.deepcopy(sparse).train(), images, labels)
    timings = measure_interleaved(steps, device, min_rounds=plan.train_rounds, budget_s=plan.train_budget_s)
    base = Row("dense ViT", "train step", "dense ViT", None, train_setting, timings["dense ViT"], plan.train_batch)
    sp = Row("block-sparse MLP", "train step", sparse_name, "dense ViT", train_setting, timings.get(sparse_name),
             plan.train_batch, check=checks["sparse"])
    if not ok[sparse_name]:
        sp.skipped = "wrong result, not timed"
    _against([sp], base)
    rows += [base, sp]
    bar.advance("training step timed")
    return rows


# -- (c) masked attention ---------------------------------------------------------------
def attention_skip_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the fused masked attention cannot be timed on ``device``, or None."""
    if device.type != "cuda":
        return ("GPU only: the fused kernel is Triton on CUDA; on the CPU masked_attention runs the unfused "
                "torch formula, so there is no fused kernel to time")
    from ..ops.masked_attention import MASKED_ATTENTION_SUPPORT

    q = torch.zeros(1, 1, 4, 8, device=device, dtype=dtype)
    return MASKED_ATTENTION_SUPPORT.reject_reason("triton", [q, q, q], dtype, device.type)


def _attention_inputs(b: int, h: int, n: int, d: int, keep_frac: float, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    order = torch.rand(b, n, generator=gen).argsort(dim=1)
    keep = torch.zeros(b, n)
    keep.scatter_(1, order[:, : max(1, round(keep_frac * n))], 1.0)
    keep[:, 0] = 1.0  # the class token
    dout = torch.randn(b, h, n, d, generator=gen).to(device, dtype)
    return q, k, v, keep.to(device), dout


def _no_grad(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return fn()


def run_attention(plan: Plan, device: torch.device, bar: Progress) -> list[Row]:
    """Part (c): per (B, H, N, D) and mode, SDPA (no mask) vs fused and unfused masked attention."""
    from .. import reference
    from ..ops import masked_attention

    dt = str(plan.dtype).replace("torch.", "")
    reason = attention_skip_reason(device, plan.dtype)
    if reason is not None:
        return [Row("masked attention", "fwd, fwd+bwd", "sparsevit masked_attention (fused)", "SDPA (no mask)",
                    {"dtype": dt}, skipped=reason)]
    rows = []
    for b, h, n, d in plan.attention:
        q, k, v, keep, dout = _attention_inputs(b, h, n, d, plan.attention_keep, device, plan.dtype)
        contenders = {
            "SDPA (dense, no mask)": lambda: F.scaled_dot_product_attention(q, k, v),
            "masked_attention (fused, triton)": lambda: masked_attention(q, k, v, keep, backend="triton"),
            "masked_attention (unfused, torch)": lambda: masked_attention(q, k, v, keep, backend="torch"),
        }
        leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
        ref_out = reference.masked_attention(*leaves, keep, None, 1e-6)
        ref = [ref_out.detach()] + list(torch.autograd.grad(ref_out, leaves, dout.float()))
        for mode in ("fwd", "fwd+bwd"):
            setting = {"B": b, "H": h, "N": n, "D": d, "keep": plan.attention_keep, "dtype": dt}
            flops = 4 * b * h * n * n * d * (3.5 if mode == "fwd+bwd" else 1.0)
            mode_rows = []
            for name, fn in contenders.items():
                if mode == "fwd":
                    call = (lambda fn=fn: _no_grad(fn))
                else:
                    call = (lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), dout))
                row = Row("masked attention", mode, name, None if name.startswith("SDPA") else "SDPA (dense, no mask)",
                          setting, flops=flops)
                if not name.startswith("SDPA"):
                    got = [fn().detach()] if mode == "fwd" else [fn().detach(), *call()]
                    err = max(_rel_error(g, r) for g, r in zip(got, ref))
                    row.check = {"against": "float32 reference", "max_rel_error": err, "tolerance": 3e-2, "ok": err <= 3e-2}
                    if not row.check["ok"]:
                        row.skipped = f"wrong result, not timed: error {err:.3g} > 3e-2"
                if row.skipped is None:
                    row.timing = measure(call, device)
                mode_rows.append(row)
            _against(mode_rows[1:], mode_rows[0])
            rows += mode_rows
            bar.advance(f"attention {b}x{h}x{n}x{d} {mode}")
    return rows
