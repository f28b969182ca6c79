"""Distillation of a teacher's candidate ranking into a bi-encoder (KL over each query's candidates)."""

from __future__ import annotations

import torch
from torch import nn


class KLDistillationLoss(nn.Module):
    r"""The student's softmax over a query's candidates follows the teacher's.

    .. math::
        \mathcal{L} = \frac{1}{B}\sum_{i=1}^{B} \mathrm{KL}\Big(\mathrm{softmax}(t_i/\tau_t)\;\Big\|\;
            \mathrm{softmax}(s_i/\tau_s)\Big),\qquad s_{ij} = q_i\cdot d_{ij}

    Shapes: ``query`` [B, dim]; ``positive`` [B, dim] (candidate 0 of each query); ``negative``
    [B*k, dim] (candidates 1..k, query-major) or None; ``teacher`` [B, 1+k] the teacher's scores
    of the same candidates (a cross-encoder's logits, ColBERT's MaxSim, an LLM's log P(yes), or
    scores given in the records).  Only each query's own candidates are scored: they are the
    documents the teacher saw, so the loss needs no gathering across workers (cross-worker
    negatives still apply to an InfoNCE term added beside it).
    ``student_temperature`` :math:`\tau_s` matches the InfoNCE temperature of a cosine student;
    ``teacher_temperature`` :math:`\tau_t` sets how sharp the teacher's distribution is.
    References: Hofstätter et al. 2020 (cross-architecture distillation); RocketQAv2 / FlagEmbedding
    (KL to the reranker's listwise distribution); Tevatron, sentence-transformers DistillKLDivLoss.
    """

    def __init__(self, student_temperature: float = 0.05, teacher_temperature: float = 1.0):
        super().__init__()
        if student_temperature <= 0 or teacher_temperature <= 0:
            raise ValueError("distillation temperatures must be > 0")
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
                teacher: torch.Tensor) -> torch.Tensor:
        query = query.float()
        b = query.shape[0]
        cands = positive.float()[:, None, :]
        if negative is not None:
            cands = torch.cat([cands, negative.float().view(b, -1, query.shape[-1])], dim=1)  # [B, 1+k, dim]
        if teacher.shape != cands.shape[:2]:
            raise ValueError(f"teacher scores {tuple(teacher.shape)} do not match the candidates {tuple(cands.shape[:2])}")
        student = torch.einsum("bd,bcd->bc", query, cands) / self.student_temperature
        target = torch.log_softmax(teacher.float().to(query.device) / self.teacher_temperature, dim=-1)
        return nn.functional.kl_div(torch.log_softmax(student, dim=-1), target, log_target=True, reduction="batchmean")
