"""Losses for sparse students: DynamicViT's objective and knowledge distillation.

DynamicViT (Rao et al., NeurIPS 2021, Eq. 14):

    L = L_cls + λ_ratio·L_ratio + λ_KL·L_KL + λ_distill·L_distill

* L_cls: cross-entropy with the labels;
* L_ratio = (1/B) Σ_b Σ_s (ρ^s − (1/N) Σ_i D̂^{b,s}_i)²  (the public code divides the
  stage sum by S; ``average_stages=True`` does the same);
* L_KL = T² · KL(softmax(y'/T) ‖ softmax(y/T)) to the dense teacher's logits y', as
  the public code computes it (``F.kl_div`` of log-probabilities, batch mean);
* L_distill = mean over the kept final patch tokens and channels of (t − t')² (the
  token count floored at 1).

Defaults λ_ratio = 2, λ_KL = 0.5, λ_distill = 0.5 (the public ones).

Knowledge distillation (Hinton et al. 2015; DeiT, Touvron et al. 2021;
Allen-Zhu & Li, ICLR 2023 for ensembles and self-distillation):
:class:`DistillationLoss` with ``"soft"`` (T²·KL) or ``"hard"`` (cross-entropy with
the teacher's argmax) targets, mixed with the label loss by α; the teacher logits
may be an average over an ensemble (:func:`ensemble_logits`), or a same-architecture
teacher (self-distillation).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dynamicvit import DynamicViTOutput

__all__ = ["DynamicViTLoss", "DistillationLoss", "ensemble_logits", "ratio_loss", "kept_token_mse", "soft_kl"]


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def ratio_loss(decisions: Sequence[torch.Tensor], keep_ratios: Sequence[float], average_stages: bool = False) -> torch.Tensor:
    """(1/B) Σ_b Σ_s (ρ^s − mean_i D̂^{b,s}_i)²; divided by S with ``average_stages``."""
    if len(decisions) != len(keep_ratios) or not decisions:
        raise ValueError(f"need one keep ratio per stage: {len(decisions)} decisions, {len(keep_ratios)} ratios")
    total = sum(((d.float().mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, keep_ratios))
    return total / len(decisions) if average_stages else total


def kept_token_mse(tokens: torch.Tensor, teacher_tokens: torch.Tensor, keep: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Mean squared error over the kept patch tokens: Σ_{b,i} D̂_bi ‖t_bi − t'_bi‖² / (C · max(Σ D̂, 1)).

    The count is at least 1 so that a batch keeping no token gives 0 with a bounded gradient.
    """
    s, t = tokens[:, num_prefix:], teacher_tokens[:, num_prefix:].detach()
    if s.shape != t.shape:
        raise ValueError(f"teacher_tokens must match the student's tokens {tuple(tokens.shape)}, got {tuple(teacher_tokens.shape)}")
    w = keep.to(s.dtype).unsqueeze(-1)
    return (((s - t) ** 2) * w).sum() / (w.sum().clamp_min(1.0) * s.shape[-1])


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


class DynamicViTLoss(nn.Module):
    """DynamicViT's training objective (see the module docstring).

    ``forward(output, labels, teacher_logits=None, teacher_tokens=None)`` returns the
    total loss; the parts of the last call are in ``self.last`` (floats). The KL and
    token terms are skipped when their teacher inputs are None.
    """

    def __init__(self, ratio_weight: float = 2.0, kl_weight: float = 0.5, distill_weight: float = 0.5,
                 temperature: float = 1.0, average_stages: bool = False, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ratio_weight = _check_weight("ratio_weight", ratio_weight)
        self.kl_weight = _check_weight("kl_weight", kl_weight)
        self.distill_weight = _check_weight("distill_weight", distill_weight)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.average_stages = bool(average_stages)
        self.label_smoothing = float(label_smoothing)
        self.last: dict = {}

    def forward(self, output: DynamicViTOutput, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                teacher_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(output, DynamicViTOutput):
            raise TypeError(f"output must be a DynamicViTOutput (a training-mode forward), got {type(output).__name__}")
        logits = output.logits
        cls = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        ratio = ratio_loss(output.decisions, output.keep_ratios, self.average_stages)
        total = cls + self.ratio_weight * ratio
        parts = {"cls": float(cls.detach()), "ratio": float(ratio.detach())}
        if teacher_logits is not None:
            kl = soft_kl(logits, teacher_logits, self.temperature)
            total = total + self.kl_weight * kl
            parts["kl"] = float(kl.detach())
        if teacher_tokens is not None:
            distill = kept_token_mse(output.tokens, teacher_tokens, output.decisions[-1], output.num_prefix)
            total = total + self.distill_weight * distill
            parts["distill"] = float(distill.detach())
        self.last = parts
        return total


def ensemble_logits(teachers: Sequence[nn.Module], images: torch.Tensor) -> torch.Tensor:
    """The average of several teachers' logits, computed without gradients (eval mode)."""
    if not teachers:
        raise ValueError("teachers must hold at least one model")
    with torch.no_grad():
        outs = []
        for t in teachers:
            was = t.training
            t.eval()
            outs.append(t(images).float())
            t.train(was)
    return torch.stack(outs).mean(0)


class DistillationLoss(nn.Module):
    """Label loss mixed with distillation from teacher logits (DeiT style).

    ``soft``: (1 − α)·CE(y, labels) + α·T²·KL(softmax(y'/T) ‖ softmax(y/T));
    ``hard``: (1 − α)·CE(y, labels) + α·CE(y, argmax y'); ``none``: CE only.
    A student with two heads (DeiT distillation token) passes ``(y_cls, y_dist)``: the
    label loss uses the first, the distillation loss the second.
    """

    def __init__(self, mode: str = "soft", alpha: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__()
        if mode not in ("soft", "hard", "none"):
            raise ValueError(f"mode must be 'soft', 'hard' or 'none', got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.mode, self.alpha, self.temperature = mode, float(alpha), float(temperature)

    def forward(self, student_logits, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        y_cls, y_dist = student_logits if isinstance(student_logits, tuple) else (student_logits, student_logits)
        base = F.cross_entropy(y_cls, labels)
        if self.mode == "none":
            return base
        if teacher_logits is None:
            raise ValueError(f"teacher_logits are required with mode={self.mode!r}")
        if self.mode == "soft":
            dist = soft_kl(y_dist, teacher_logits, self.temperature)
        else:
            dist = F.cross_entropy(y_dist, teacher_logits.argmax(dim=-1))
        return (1 - self.alpha) * base + self.alpha * dist
