"""Universal lottery tickets: one frozen ticket, many tasks, only a new linear head trained
(Burkholz et al., "On the Existence of Universal Lottery Tickets", ICLR 2022).

A ticket found on a source task -- an edge-popup supermask (:class:`~.supermask.SupermaskLayer`)
or a network pruned by IMP / any :class:`~.masks.MaskManager` -- is frozen entirely
(weights, scores, masks, norms: ``requires_grad=False``, and the backbone is kept in
eval mode so dropout and batch-norm statistics do not move).  For each target task
``t`` a new linear layer is trained on the ticket's features:

    y_t = A_t · φ(x) + b_t,      A_t ∈ R^{C_t × F},  b_t ∈ R^{C_t},

with ``φ`` the frozen ticket's feature map (for a timm ViT
``forward_head(forward_features(x), pre_logits=True)``: the pooled, normed token
before the old head, which is not used) and ``C_t`` the task's number of classes.
Only ``A_t`` and ``b_t`` receive gradients; ``φ`` is evaluated under ``torch.no_grad``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .supermask import supermask_layers
from .ticket_apply import manager_of

__all__ = ["UniversalTicket", "attach_task_head", "freeze_ticket", "ticket_features", "ticket_sparsity"]

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _check_module(name: str, value: object) -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int >= 1, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes}")
    return num_classes


def _check_task_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (the task name), got {type(name).__name__}")
    if not name or "." in name:
        raise ValueError(f"name must be a non-empty str without '.', got {name!r}")
    return name


def freeze_ticket(model: nn.Module) -> nn.Module:
    """Freeze ``model`` in place: ``p.requires_grad = False`` for every parameter (weights, supermask
    scores, norms) and ``model.eval()``; returns ``model``.

    Masks of a :class:`~.masks.MaskManager` are plain tensors outside the model: with the
    weights frozen no optimizer step can change ``W = W ⊙ M``.
    """
    _check_module("model", model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def _check_timm_features(model: nn.Module) -> None:
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise TypeError(f"backbone {type(model).__name__} has no forward_features/forward_head (not a timm model): "
                        "pass feature_fn(backbone, x) -> (B, F) features")


def ticket_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``φ(x)`` of a timm-style model: ``model.forward_head(model.forward_features(x), pre_logits=True)``, ``(B, F)``.

    A model without ``forward_features`` / ``forward_head`` is a TypeError: pass ``feature_fn``.
    """
    _check_timm_features(model)
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _infer_feature_dim(model: nn.Module) -> Optional[int]:
    """The width of timm's pre-logits features (``head_hidden_size``, else ``num_features``), or None."""
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def ticket_sparsity(model: nn.Module) -> float:
    """Sparsity of the weights the ticket masks, ``1 − Σ kept / Σ numel`` over its supermask layers
    (kept = ``k`` units times the unit size), else over every weight of 2+ dims (exact zeros count as pruned)."""
    _check_module("model", model)
    layers = supermask_layers(model)
    if layers:
        total = sum(l.inner.weight.numel() for l in layers.values())
        kept = sum(l.k * (l.inner.weight.numel() // l.scores.numel()) for l in layers.values())
        return 1.0 - kept / total
    weights = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
               and m.weight.dim() >= 2]
    total = sum(w.numel() for w in weights)
    if total == 0:
        raise ValueError("model has no weight of 2 or more dims: no ticket sparsity to measure")
    return sum(int((w == 0).sum()) for w in weights) / total


class UniversalTicket(nn.Module):
    """A frozen ticket ``backbone`` with one trainable linear head per task: ``y_t = A_t · φ(x) + b_t``.

    ``backbone``: the ticket (frozen in place by :func:`freeze_ticket`; kept in eval mode
    whatever :meth:`train` is called with).  ``num_classes``: if given, a first task named
    ``task`` is added.  ``feature_fn(backbone, x) -> (B, F)``: the feature map ``φ``
    (default :func:`ticket_features`, for timm models).  ``feature_dim``: ``F`` (default
    timm's ``head_hidden_size`` / ``num_features``).  ``seed``: the heads' initialisation
    (``nn.Linear``'s default, drawn from a generator seeded with ``seed`` + the task index).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Optional[int] = None,
        *,
        feature_fn: Optional[FeatureFn] = None,
        feature_dim: Optional[int] = None,
        task: str = "target",
        seed: int = 0,
    ):
        super().__init__()
        _check_module("backbone", backbone)
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"feature_fn must be a callable (backbone, x) -> features, got {type(feature_fn).__name__}")
        if feature_fn is None:
            _check_timm_features(backbone)
        if feature_dim is None:
            feature_dim = _infer_feature_dim(backbone)
            if feature_dim is None:
                raise ValueError("feature_dim must be given: it cannot be read from backbone "
                                 "(no int head_hidden_size / num_features)")
        elif isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be an int >= 1, got {feature_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.backbone = freeze_ticket(backbone)
        self.feature_fn: FeatureFn = ticket_features if feature_fn is None else feature_fn
        self.feature_dim = feature_dim
        self.seed = seed
        self.heads = nn.ModuleDict()
        self.active_task: Optional[str] = None
        if num_classes is not None:
            self.add_task(task, num_classes)

    @classmethod
    def from_mask_manager(cls, ticket: object, num_classes: Optional[int] = None, **kwargs) -> "UniversalTicket":
        """The universal ticket of a :class:`~.masks.MaskManager` ticket (or a trainer holding one in
        ``.manager``: LotteryTicket, RigL, SET, StaticSparse): its model, masks applied once more
        (``W ← W ⊙ M``), then frozen.  Other arguments as for the constructor."""
        manager = manager_of(ticket)
        if manager is None:
            raise TypeError(f"ticket must be a MaskManager or hold one in .manager, got {type(ticket).__name__}")
        manager.apply_masks()
        return cls(manager.model, num_classes, **kwargs)

    # ----------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        """The task names, in the order they were added."""
        return list(self.heads.keys())

    def add_task(self, name: str, num_classes: int) -> nn.Linear:
        """Add the head ``A_t, b_t`` of a new task ``name`` with ``num_classes`` classes; returns it.

        The first task added becomes the active one (see :meth:`select_task`).
        """
        name = _check_task_name(name)
        num_classes = _check_num_classes(num_classes)
        if name in self.heads:
            raise ValueError(f"name {name!r} is already a task of this ticket: {self.tasks}")
        ref = next(self.backbone.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        # Built on the meta device so the global RNG is not consumed; filled from our own generator.
        head = nn.Linear(self.feature_dim, num_classes, device="meta").to_empty(device=device).to(dtype)
        generator = torch.Generator().manual_seed(self.seed + len(self.heads))
        bound = 1.0 / self.feature_dim ** 0.5  # nn.Linear's default: U(−1/√F, 1/√F) for A_t and b_t
        with torch.no_grad():
            head.weight.copy_(torch.empty(head.weight.shape).uniform_(-bound, bound, generator=generator))
            head.bias.copy_(torch.empty(head.bias.shape).uniform_(-bound, bound, generator=generator))
        self.heads[name] = head
        if self.active_task is None:
            self.active_task = name
        return head

    def _resolve_task(self, task: Optional[str]) -> str:
        if task is None:
            if self.active_task is None:
                raise ValueError("task must be given: this ticket has no task yet (add_task(name, num_classes))")
            return self.active_task
        if not isinstance(task, str):
            raise TypeError(f"task must be a str (a task name), got {type(task).__name__}")
        if task not in self.heads:
            raise ValueError(f"task {task!r} is not a task of this ticket; known tasks: {self.tasks}")
        return task

    def head(self, task: Optional[str] = None) -> nn.Linear:
        """The head of ``task`` (default: the active task)."""
        return self.heads[self._resolve_task(task)]

    def select_task(self, task: str) -> "UniversalTicket":
        """Make ``task`` the one ``forward(x)`` uses and the only head with ``requires_grad``; returns ``self``.

        So ``fit(ticket.select_task(name), x, y_name, ...)`` trains exactly ``A_name, b_name``.
        """
        task = self._resolve_task(task)
        for name, head in self.heads.items():
            for p in head.parameters():
                p.requires_grad_(name == task)
        self.active_task = task
        return self

    def trainable_parameters(self, task: Optional[str] = None) -> Iterator[nn.Parameter]:
        """The parameters of ``task``'s head (default: the active task): all that trains for it."""
        return self.head(task).parameters()

    # --------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> "UniversalTicket":
        """Heads follow ``mode``; the frozen backbone always stays in eval mode."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        self.training = mode
        self.heads.train(mode)
        self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``φ(x)``: the frozen ticket's features ``(B, F)``, without a graph (no gradient reaches the ticket)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        with torch.no_grad():
            feats = self.feature_fn(self.backbone, x)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[1] != self.feature_dim:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"feature_fn must return (B, feature_dim={self.feature_dim}) features, got {got}")
        return feats

    def forward(self, x: torch.Tensor, task: Optional[str] = None) -> torch.Tensor:
        """``y_t = A_t · φ(x) + b_t`` for ``task`` (default: the active task), ``(B, C_t)``."""
        head = self.head(task)
        return head(self.features(x))


def attach_task_head(model: nn.Module, num_classes: int, *, task: str = "target",
                     feature_fn: Optional[FeatureFn] = None, feature_dim: Optional[int] = None,
                     seed: int = 0) -> UniversalTicket:
    """Freeze the ticket ``model`` and attach one new linear head: ``y = A · φ(x) + b`` (see :class:`UniversalTicket`)."""
    _check_module("model", model)
    return UniversalTicket(model, num_classes, feature_fn=feature_fn, feature_dim=feature_dim, task=task, seed=seed)
