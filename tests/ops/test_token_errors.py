"""Bad input to the token ops: a TypeError/ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

import sparsevit


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 6, 4)


def test_gather_rank_and_type(x: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"x must have 3 dims \(B, N, C\)"):
        sparsevit.gather_tokens(x[0], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sparsevit.gather_tokens([[1.0]], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"index must have 2 dims \(B, K\)"):
        sparsevit.gather_tokens(x, torch.zeros(2, 3, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        sparsevit.gather_tokens(x.double(), torch.zeros(2, 3, dtype=torch.long))


def test_gather_index_problems(x: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        sparsevit.gather_tokens(x, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        sparsevit.gather_tokens(x, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="B=2 matching x"):
        sparsevit.gather_tokens(x, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"index entries must lie in \[0, N=6\)"):
        sparsevit.gather_tokens(x, torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(ValueError, match=r"index entries must lie in \[0, N=6\)"):
        sparsevit.gather_tokens(x, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="same device"):
        sparsevit.gather_tokens(x, torch.zeros(2, 3, dtype=torch.long, device="meta"))


def test_scatter_problems(x: torch.Tensor) -> None:
    src = torch.randn(2, 3, 4)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="n .* is required"):
        sparsevit.scatter_tokens(src, idx)
    with pytest.raises(ValueError, match="K=3 matching src"):
        sparsevit.scatter_tokens(src, idx[:, :2], 6)
    with pytest.raises(ValueError, match="distinct"):
        sparsevit.scatter_tokens(src, torch.tensor([[0, 1, 1], [3, 4, 5]]), 6)
    with pytest.raises(ValueError, match=r"\[0, N=6\)"):
        sparsevit.scatter_tokens(src, torch.tensor([[0, 1, 6], [3, 4, 5]]), 6)
    with pytest.raises(TypeError, match="base must have the dtype"):
        sparsevit.scatter_tokens(src, idx, base=x.half())
    with pytest.raises(ValueError, match="base must be"):
        sparsevit.scatter_tokens(src, idx, base=torch.randn(2, 6, 5))
    with pytest.raises(ValueError, match="disagrees"):
        sparsevit.scatter_tokens(src, idx, 7, base=x)
    with pytest.raises(TypeError, match="n must be an int"):
        sparsevit.scatter_tokens(src, idx, 6.0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        sparsevit.scatter_add_tokens(src, idx, -1)


def test_backend_argument(x: torch.Tensor) -> None:
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(sparsevit.BackendUnavailableError, match="must be one of"):
        sparsevit.gather_tokens(x, idx, backend="cudnn")
    with pytest.raises(ValueError, match="cuda: needs CUDA tensors"):
        sparsevit.gather_tokens(x, idx, backend="cuda")
    with pytest.raises(TypeError, match="backend must be a str"):
        sparsevit.gather_tokens(x, idx, backend=1)
