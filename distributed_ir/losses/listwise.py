"""Listwise (grouped) softmax cross-entropy for rerankers."""

from __future__ import annotations

import torch
from torch import nn


class ListwiseSoftmaxLoss(nn.Module):
    r"""Softmax over each query's group of candidates; the positive must win.

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum_{b=1}^{B} \log\frac{\exp(s_{b,t_b}/\tau)}{\sum_{g=1}^{G}\exp(s_{b,g}/\tau)}

    Shapes: ``scores`` [B, G] (query b's scores for its G candidates), ``targets`` [B] the
    column of each positive (default 0: "1 positive + k negatives", positive first).  The same
    loss trains a cross-encoder or LLM reranker on groups (G = 1 + k) and ColBERT on the
    in-batch score matrix (G = every document in the batch, target = the query's own positive).
    ``temperature`` :math:`\tau` matters for bounded scores (ColBERT's MaxSim is in [-1, 1]).
    References: Gao et al. 2021 ("Rethink Training of BERT Rerankers", LCE loss);
    FlagEmbedding reranker / bge-m3 training.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def forward(self, scores: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if scores.ndim != 2:
            raise ValueError(f"scores must be [B, G], got shape {tuple(scores.shape)}")
        if targets is None:
            targets = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        return nn.functional.cross_entropy(scores.float() / self.temperature, targets)
