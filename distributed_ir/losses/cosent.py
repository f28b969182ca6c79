"""CoSENT loss for scored (query, document, label) pairs."""

from __future__ import annotations

import torch
from torch import nn


class CoSENTLoss(nn.Module):
    r"""Ranking loss on cosine scores: every pair with a higher label must score higher.

    .. math::
        \mathcal{L} = \log\Big(1 + \sum_{(i,j):\, y_i > y_j} \exp\big(\lambda (s_j - s_i)\big)\Big),
        \quad s_i = \cos(q_i, d_i)

    Shapes: ``query`` and ``document`` [B, dim], ``labels`` [B] (any real numbers; only their
    order matters). ``scale`` is :math:`\lambda` (20 by default, i.e. temperature 0.05).
    Reference: Su Jianlin 2022, "CoSENT"; sentence-transformers CoSENTLoss.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, query: torch.Tensor, document: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scores = nn.functional.cosine_similarity(query.float(), document.float(), dim=-1) * self.scale
        diff = scores[None, :] - scores[:, None]  # diff[i, j] = s_j - s_i
        mask = labels[:, None] > labels[None, :]  # y_i > y_j
        diff = diff[mask]
        # log(1 + sum exp(x)) = logsumexp([0, x...])
        return torch.logsumexp(torch.cat([diff.new_zeros(1), diff]), dim=0)
