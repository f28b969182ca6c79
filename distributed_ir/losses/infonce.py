"""InfoNCE with in-batch, hard and cross-worker negatives."""

from __future__ import annotations

import torch
from torch import nn

from distributed_ir.losses.false_negatives import gathered_keys, shared_positive_mask
from distributed_ir.losses.gather import gather_with_grad, world


class InfoNCELoss(nn.Module):
    r"""Contrastive loss over every document in the (gathered) batch.

    .. math::
        \mathcal{L} = -\frac{1}{B}\sum_{i=1}^{B}
            \log\frac{\exp(q_i\cdot d_i^+/\tau)}{\sum_{d\in D}\exp(q_i\cdot d/\tau)}

    where :math:`D` holds all positives and hard negatives of every query on every worker.

    Shapes: ``query`` [B, dim], ``positive`` [B, dim], ``negative`` [B*k, dim] or None
    (k hard negatives per query, any order). Vectors are scored by dot product (normalise in
    the model for cosine).  ``doc_keys`` [B(1+k)] (positives then negatives) and
    ``positive_keys`` [B, P] (keys of every positive of each query) mask false negatives: a
    column whose document is a positive of the row's query, other than its label, scores -inf
    (:mod:`distributed_ir.losses.false_negatives`), on every worker's columns alike.  With ``gather=True`` and W workers, documents are all-gathered
    *with gradient* into [W*B(1+k), dim] and query i on rank r targets column r*B + i.

    Distributed maths: rank r's loss is the mean over its B queries, L_r.  The union-batch loss
    is L = (1/W) sum_r L_r.  The gather's backward hands every rank sum_r' dL_r'/d(own docs);
    DDP then averages gradients over W, giving exactly dL/dtheta — so 2 workers x B equals
    1 worker x 2B (tested in tests/test_distributed_equivalence.py).

    References: van den Oord et al. 2018 (CPC); Karpukhin et al. 2020 (DPR);
    FlagEmbedding / Tevatron cross-device negatives.
    """

    def __init__(self, temperature: float = 0.05, gather: bool = True):
        super().__init__()
        self.temperature = temperature
        self.gather = gather

    def forward(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None,
                doc_keys: torch.Tensor | None = None, positive_keys: torch.Tensor | None = None) -> torch.Tensor:
        query, positive = query.float(), positive.float()
        batch = query.shape[0]
        rank, size = world() if self.gather else (0, 1)
        if self.gather and size > 1:
            positive = gather_with_grad(positive)
            negative = gather_with_grad(negative.float()) if negative is not None else None
        docs = positive if negative is None else torch.cat([positive, negative.float()], dim=0)
        scores = query @ docs.T / self.temperature
        labels = torch.arange(batch, device=query.device) + rank * batch
        if doc_keys is not None and positive_keys is not None:
            keys = gathered_keys(doc_keys, batch, self.gather and size > 1)
            scores = scores.masked_fill(shared_positive_mask(keys, positive_keys, labels), float("-inf"))
        return nn.functional.cross_entropy(scores, labels)
