"""Sparse training: masks and layer densities, RigL / SET / static sparse, lottery tickets, supermasks.

* :mod:`.density` -- uniform / Erdős–Rényi / ERK layer densities (Evci et al. 2020);
* :mod:`.masks` -- :class:`MaskManager`: exact-zero masked weights, masked gradients,
  element or ``b × b`` block granularity, DDP-consistent masks, masks sharded like FSDP2 weights;
* :mod:`.sharding` -- FSDP2 (``fully_shard``) row shards and exact top-k across them;
* :mod:`.distributed_checkpoint` -- trainer state in ``torch.distributed.checkpoint`` checkpoints;
* :mod:`.rigl` -- :class:`RigL`, :class:`SET`, :class:`StaticSparse`;
* :mod:`.lottery` -- :class:`LotteryTicket`: iterative magnitude pruning with rewinding
  (Frankle & Carbin 2019, Frankle et al. 2020);
* :mod:`.supermask` -- edge-popup supermasks on frozen random weights (Ramanujan et al. 2020);
* :mod:`.tickets` -- masks to and from files (safetensors where available);
* :mod:`.pruning_at_init` -- :func:`prune_at_init`: magnitude / SNIP / SynFlow pruning at
  initialisation, one-shot or iterative;
* :mod:`.sign_flip` -- :class:`SignFlipOptimizer`: Bop sign learning with fixed magnitudes;
* :mod:`.peekaboo` -- :class:`PeekABoo`: prune at init, then learn only the kept weights' signs
  (Chen et al. 2022);
* :mod:`.rst` -- :class:`RandomSparseTransformation`: Dual LTH, a random mask made trainable by a
  growing L2 penalty outside it (Bai et al. 2022);
* :mod:`.universal` -- :class:`UniversalTicket`: a frozen ticket with a new linear head per task
  (Burkholz et al. 2022);
* :mod:`.loop` -- a minimal training loop for the built-in IMP rounds and the suites;
* :mod:`.block_sparse` -- :func:`to_block_sparse`: block-masked Linears to ``BlockSparseLinear``;
* :mod:`.block_sparse_training` -- :func:`train_block_sparse`: sparse training on the block-sparse kernels.
"""

from .block_sparse import BlockSparseReport, to_block_sparse
from .block_sparse_training import BlockSparseTrainedLinear, train_block_sparse
from .density import DISTRIBUTIONS, layer_densities
from .distributed_checkpoint import load_distributed_checkpoint, save_distributed_checkpoint
from .lottery import LotteryTicket
from .loop import accuracy, fit, minibatches
from .masks import BLOCK_SIZES, GRANULARITIES, MaskedWeight, MaskManager, default_filter, reset_optimizer_state
from .peekaboo import PeekABoo
from .pruning_at_init import SCORES, prune_at_init, pruning_scores
from .rst import RandomSparseTransformation, rst_lambda
from .rigl import SET, DynamicSparseTraining, RigL, StaticSparse, cosine_drop_fraction
from .sign_flip import SignFlipOptimizer
from .supermask import SupermaskLayer, convert_to_supermask, supermask_layers, topk_straight_through
from .ticket_apply import apply_ticket
from .tickets import load_ticket, save_ticket
from .universal import UniversalTicket, attach_task_head, freeze_ticket, ticket_features, ticket_sparsity

__all__ = [
    "BlockSparseReport",
    "to_block_sparse",
    "BlockSparseTrainedLinear",
    "train_block_sparse",
    "BLOCK_SIZES",
    "DISTRIBUTIONS",
    "GRANULARITIES",
    "DynamicSparseTraining",
    "LotteryTicket",
    "MaskManager",
    "MaskedWeight",
    "PeekABoo",
    "SCORES",
    "SignFlipOptimizer",
    "minibatches",
    "prune_at_init",
    "pruning_scores",
    "RandomSparseTransformation",
    "RigL",
    "rst_lambda",
    "SET",
    "StaticSparse",
    "SupermaskLayer",
    "accuracy",
    "convert_to_supermask",
    "cosine_drop_fraction",
    "default_filter",
    "fit",
    "layer_densities",
    "load_distributed_checkpoint",
    "save_distributed_checkpoint",
    "load_ticket",
    "apply_ticket",
    "reset_optimizer_state",
    "save_ticket",
    "supermask_layers",
    "topk_straight_through",
    "UniversalTicket",
    "attach_task_head",
    "freeze_ticket",
    "ticket_features",
    "ticket_sparsity",
]
