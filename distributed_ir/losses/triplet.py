"""Margin triplet loss."""

from __future__ import annotations

import torch
from torch import nn


class TripletMarginLoss(nn.Module):
    r"""Hinge on the score gap between a positive and each negative.

    .. math::
        \mathcal{L} = \frac{1}{|P|}\sum_{(i,j)\in P} \max(0,\; m - q_i\cdot d_i^+ + q_i\cdot d_{ij}^-)

    Shapes: ``query`` and ``positive`` [B, dim]; ``negative`` [B*k, dim] (k hard negatives per
    query, row i*k..i*k+k-1 belongs to query i) or None, in which case every other query's
    positive is a negative (in-batch). Scores are dot products (cosine for normalised vectors).
    Reference: Schroff et al. 2015 (FaceNet); sentence-transformers TripletLoss.
    """

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
        query, positive = query.float(), positive.float()
        pos = (query * positive).sum(-1, keepdim=True)  # [B, 1]
        if negative is not None:
            k = negative.shape[0] // query.shape[0]
            neg = torch.einsum("bd,bkd->bk", query, negative.float().view(query.shape[0], k, -1))
            return torch.relu(self.margin - pos + neg).mean()
        if query.shape[0] < 2:
            raise ValueError("in-batch triplet loss needs a batch of at least 2 (or hard negatives)")
        scores = query @ positive.T  # [B, B]
        off_diag = ~torch.eye(query.shape[0], dtype=torch.bool, device=query.device)
        return torch.relu(self.margin - pos + scores)[off_diag].mean()
