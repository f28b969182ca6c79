"""Pointwise binary cross-entropy on reranker logits."""

from __future__ import annotations

import torch
from torch import nn


class PointwiseBCELoss(nn.Module):
    r"""Each (query, document) pair is a yes/no question on its own.

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_{n=1}^{N} \big[y_n \log\sigma(s_n) + (1 - y_n)\log(1 - \sigma(s_n))\big]

    Shapes: ``scores`` [N] or [B, G] raw logits; ``labels`` the same shape, in [0, 1] (graded
    labels are allowed).  Called with grouped scores and no labels, column 0 is the positive and
    the other columns are negatives (the layout :class:`ListwiseSoftmaxLoss` uses).
    ``pos_weight`` rescales the positive term (k negatives per positive -> ``pos_weight=k``
    balances the classes).  Reference: Nogueira & Cho 2019 (monoBERT); sentence-transformers
    ``BinaryCrossEntropyLoss``.
    """

    def __init__(self, pos_weight: float = 1.0):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, scores: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        scores = scores.float()
        if labels is None:
            if scores.ndim != 2:
                raise ValueError("without labels, scores must be grouped [B, 1 + k] with the positive first")
            labels = torch.zeros_like(scores)
            labels[:, 0] = 1.0
        weight = torch.tensor(self.pos_weight, device=scores.device)
        return nn.functional.binary_cross_entropy_with_logits(scores, labels.float().to(scores.device),
                                                              pos_weight=weight)
