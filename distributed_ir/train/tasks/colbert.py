"""ColBERT training (task ``colbert``): every query against every document of the worker's batch
(positives then hard negatives) with ``listwise`` CE, target = the query's own positive (in-batch +
hard negatives).  Token vectors vary in length, so negatives are not gathered across workers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distributed_ir.losses import build_loss
from distributed_ir.losses.false_negatives import shared_positive_mask
from distributed_ir.models.colbert import ColBERTReranker
from distributed_ir.train.batching import TextBatch
from distributed_ir.train.tasks.reranker import RerankerTask


class ColBERTTrainModule(nn.Module):
    """ColBERT + listwise CE over the in-batch score matrix."""

    def __init__(self, reranker: ColBERTReranker, loss_fn: nn.Module):
        super().__init__()
        self.reranker = reranker
        self.loss_fn = loss_fn

    def forward(self, query: dict[str, torch.Tensor], document: dict[str, torch.Tensor],
                doc_keys: torch.Tensor | None = None, positive_keys: torch.Tensor | None = None) -> torch.Tensor:
        """``doc_keys`` / ``positive_keys``: mask columns that are positives of the row's query."""
        scores = self.reranker(query, document, all_pairs=True)  # [B, B(1+k)]; positives in the first B columns
        targets = torch.arange(scores.shape[0], device=scores.device)
        if doc_keys is not None and positive_keys is not None:
            scores = scores.masked_fill(shared_positive_mask(doc_keys, positive_keys, targets), float("-inf"))
        return self.loss_fn(scores, targets)


class ColBERTTask(RerankerTask):
    """In-batch listwise CE on pairs or triplets; ``reranker.head_lr`` trains the linear head apart."""

    name = "colbert"
    model_class = ColBERTReranker
    formats = ("pair", "triplet")

    def build(self, weights_from: str | None = None) -> nn.Module:
        return ColBERTTrainModule(self.build_reranker(weights_from), build_loss(self.cfg.loss))

    def inputs(self, module: nn.Module, batch: TextBatch) -> dict[str, Any]:
        reranker: ColBERTReranker = module.reranker
        q = reranker.tokenize(batch.queries, "query")
        d = reranker.tokenize(batch.positives + batch.negatives, "document",
                              max_length=self.cfg.train_document_max_length or None)
        keys = batch.key_tensors() if self.cfg.loss.mask_shared_positives else {}
        return {"query": q, "document": d, **keys}
