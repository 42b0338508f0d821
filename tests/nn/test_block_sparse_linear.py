"""BlockSparseLinear: masked dense equivalence, conversion, state_dict, timm Mlp, training, compile."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sparsevit import BlockSparseLayout
from sparsevit.nn import BlockSparseLinear, sparsify_linears
from sparsevit.ops.block_sparse_matmul import BLOCK_SPARSE_SUPPORT
from helpers import backend_params, device_for, require_backend


def _masked_dense(mod: BlockSparseLinear) -> nn.Linear:
    return mod.to_dense()


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_masked_dense_linear(backend: str, dtype: torch.dtype) -> None:
    """Output and the gradients of x, the kept weights and the bias equal a masked nn.Linear."""
    require_backend(backend)
    dev = device_for(backend)
    dense = nn.Linear(32, 48, device=dev)
    mod = BlockSparseLinear.from_dense(dense, block_size=16, sparsity=0.5, backend=backend).to(dtype)
    assert mod.layout.nnz_blocks == 3
    ref = _masked_dense(mod).double()
    x = torch.randn(2, 5, 32, device=dev)
    xs = x.to(dtype).clone().requires_grad_()
    xr = x.double().detach().requires_grad_()
    y, yr = mod(xs), ref(xr)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(y.double(), yr, **tol)
    g = torch.randn_like(yr)
    y.backward(g.to(dtype))
    yr.backward(g)
    torch.testing.assert_close(xs.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(mod.bias.grad.double(), ref.bias.grad, **tol)
    lay = mod.layout
    kept = ref.weight.grad.reshape(3, 16, 2, 16).transpose(1, 2)[lay.row_indices.long(), lay.col_indices.long()]
    torch.testing.assert_close(mod.weight.grad.double(), kept, **tol)


def test_from_dense_keeps_largest_blocks_and_round_trips() -> None:
    dense = nn.Linear(64, 32)
    mod = BlockSparseLinear.from_dense(dense, block_size=16, sparsity=0.75)
    assert mod.layout == BlockSparseLayout.from_dense(dense.weight, 16, 0.75)
    mask = mod.layout.to_mask().repeat_interleave(16, 0).repeat_interleave(16, 1)
    back = mod.to_dense()
    torch.testing.assert_close(back.weight, dense.weight * mask, atol=0, rtol=0)
    torch.testing.assert_close(back.bias, dense.bias, atol=0, rtol=0)
    again = BlockSparseLinear.from_dense(back, layout=mod.layout)
    torch.testing.assert_close(again.weight, mod.weight, atol=0, rtol=0)


def test_state_dict_round_trip_adopts_layout() -> None:
    src = BlockSparseLinear(32, 64, sparsity=0.25, block_size=16)
    dst = BlockSparseLinear(32, 64, sparsity=0.75, block_size=16, bias=True)  # other nnz
    assert dst.layout.nnz_blocks != src.layout.nnz_blocks
    weight = dst.weight
    with pytest.warns(UserWarning, match="resized in place"):  # optimizer state for the old size no longer fits
        dst.load_state_dict(src.state_dict())
    assert dst.layout == src.layout and dst.weight is weight
    x = torch.randn(3, 32)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    assert set(src.state_dict()) == {"weight", "bias", "row_offsets", "col_indices", "row_indices", "col_offsets",
                                     "bsc_row_indices", "bsc_perm"}


@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("triton")])
def test_inside_timm_mlp(backend: str) -> None:
    """Swap fc1/fc2 of timm's Mlp; the output equals the Mlp with block-masked weights."""
    require_backend(backend)
    mlp = Mlp(in_features=32, hidden_features=64, out_features=32)
    x = torch.randn(2, 3, 32)
    report = sparsify_linears(mlp, block_size=16, sparsity=0.5, backend=backend)
    assert report.converted == ["fc1", "fc2"] and report.skipped == {}
    assert isinstance(mlp.fc1, BlockSparseLinear) and isinstance(mlp.fc2, BlockSparseLinear)
    reference = Mlp(in_features=32, hidden_features=64, out_features=32)
    reference.fc1, reference.fc2 = mlp.fc1.to_dense(), mlp.fc2.to_dense()
    torch.testing.assert_close(mlp(x), reference(x), atol=1e-5, rtol=1e-4)


def test_timm_vit_mlp_conversion() -> None:
    """Convert only the MLPs of a tiny timm ViT; it matches the ViT with block-masked MLP weights."""
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                    num_classes=16).eval()
    reference = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                          num_classes=16).eval()
    reference.load_state_dict(vit.state_dict())
    report = sparsify_linears(vit, block_size=16, sparsity=0.5, filter=lambda name, m: ".mlp." in name)
    assert report.converted == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    assert report.skipped["blocks.0.attn.qkv"] == "excluded by the filter" and "head" in report.skipped
    for i in range(2):
        mlp = vit.blocks[i].mlp
        reference.blocks[i].mlp.fc1, reference.blocks[i].mlp.fc2 = mlp.fc1.to_dense(), mlp.fc2.to_dense()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference(x), atol=1e-5, rtol=1e-4)


def test_converter_reports_skips() -> None:
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(32, 32))
    model.add_module("odd", nn.Linear(32, 30))
    model.add_module("attn", nn.MultiheadAttention(32, 2))
    model.add_module("head", nn.Linear(32, 16))
    report = sparsify_linears(model, block_size=16, sparsity=0.5, filter=lambda name, m: name != "head")
    assert report.converted == ["fc"]
    assert report.skipped["head"] == "excluded by the filter"
    assert "out_features=30 not a multiple of block_size=16" in report.skipped["odd"]
    assert "MultiheadAttention" in report.skipped["attn.out_proj"]
    assert isinstance(model.fc, BlockSparseLinear) and type(model.head) is nn.Linear
    assert "converted 1" in str(report)


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
def test_trains(backend: str) -> None:
    """A two-layer block-sparse MLP fits a random teacher: the loss falls well below its start."""
    require_backend(backend)
    dev = device_for(backend)
    torch.manual_seed(0)
    model = nn.Sequential(
        BlockSparseLinear(32, 64, sparsity=0.5, block_size=16, backend=backend, device=dev),
        nn.GELU(),
        BlockSparseLinear(64, 16, sparsity=0.5, block_size=16, backend=backend, device=dev),
    )
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 16)).to(dev)
    x = torch.randn(32, 32, device=dev)
    with torch.no_grad():
        y = teacher(x)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("backend", backend_params(BLOCK_SPARSE_SUPPORT))
def test_compile_fullgraph(backend: str) -> None:
    require_backend(backend)
    torch._dynamo.reset()
    dev = device_for(backend)
    mod = BlockSparseLinear(32, 48, sparsity=0.5, block_size=16, backend=backend, device=dev)
    x = torch.randn(2, 3, 32, device=dev, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    x2 = x.detach().clone().requires_grad_()
    ref = mod(x2)
    (gr,) = torch.autograd.grad(ref.square().sum(), x2)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gr)


def test_errors() -> None:
    with pytest.raises(ValueError, match="give a layout or a sparsity"):
        BlockSparseLinear(32, 32)
    with pytest.raises(ValueError, match="layout shape"):
        BlockSparseLinear(32, 32, BlockSparseLayout.random((32, 64), 16, 0.5))
    with pytest.raises(ValueError, match="multiple of block_size"):
        BlockSparseLinear(40, 32, sparsity=0.5, block_size=16)
    mod = BlockSparseLinear(32, 32, sparsity=0.5, block_size=16)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 32\)"):
        mod(torch.randn(2, 16))
    with pytest.raises(TypeError, match="weight's dtype"):
        mod(torch.randn(2, 32, dtype=torch.float16))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        BlockSparseLinear.from_dense(mod, block_size=16, sparsity=0.5)
