"""Cross-encoder training (task ``cross_encoder``): one logit per (query, document) pair."""

from __future__ import annotations

from distributed_ir.models.cross_encoder import CrossEncoderReranker
from distributed_ir.train.tasks.reranker import PairwiseRerankerTask


class CrossEncoderTask(PairwiseRerankerTask):
    """Listwise or BCE over the pairs' logits; ``reranker.head_lr`` trains the classifier (+ pooler) apart."""

    name = "cross_encoder"
    model_class = CrossEncoderReranker
