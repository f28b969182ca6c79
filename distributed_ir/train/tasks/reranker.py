"""What the reranker tasks share (``cross_encoder``, ``colbert``, ``llm_reranker``).

They plug into the same loop, engines (DDP | DeepSpeed), checkpoints and Ray Train launch as the
embedder.  Batches come from triplet records: query i has one positive and ``num_negatives`` hard
negatives (negatives query-major).

:class:`RerankerTask`: the model (its settings are ``cfg.reranker``), the head's own learning rate
and the export.  :class:`PairwiseRerankerTask` (cross-encoder, LLM): the group of query i is
``[positive_i, negative_i1 .. negative_ik]`` (row ``i*(1+k) + j``), scored in one forward; loss
``listwise`` (softmax CE over the group, positive first) or ``bce`` (pointwise, column 0
labelled 1).  ``bce`` also takes scored records (query, document, label in [0, 1]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import ConfigError
from distributed_ir.losses import build_loss
from distributed_ir.models.reranker_base import RerankerBase
from distributed_ir.train.batching import TextBatch
from distributed_ir.train.tasks.base import TrainTask, enable_gradient_checkpointing


class RerankerTask(TrainTask):
    """A reranker task: ``model_class`` built with ``cfg.reranker``; LoRA only where ``supports_lora``."""

    model_class: ClassVar[type[RerankerBase]]
    supports_lora: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if cfg.lora.enabled and not self.supports_lora:
            raise ConfigError(f"lora is supported for task=llm_reranker (and embedder), not {self.name}",
                              key="lora.enabled")

    def build_reranker(self, weights_from: str | None) -> RerankerBase:
        """The reranker to train: ``cfg.model.name_or_path`` (or ``weights_from``) with ``cfg.reranker``."""
        model = self.model_class.from_pretrained(weights_from or self.cfg.model.name_or_path, settings=self.cfg.reranker,
                                                 trust_remote_code=self.cfg.model.trust_remote_code)
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model.scoring_backbone())
        return model

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """``reranker.head_lr`` > 0: the head's parameters (``head_parameters()``) in a group of their own."""
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not self.cfg.reranker.head_lr:
            return [{"params": trainable}]
        head = {id(p) for p in module.reranker.head_parameters()}
        return [{"params": [p for p in trainable if id(p) not in head]},
                {"params": [p for p in trainable if id(p) in head], "lr": self.cfg.reranker.head_lr}]

    def export(self, module: nn.Module, path: Path) -> Path:
        return module.reranker.save(path)


def group_pairs(batch: TextBatch) -> tuple[list[str], list[str], int]:
    """Flatten a batch into (query, document) rows, query-major: positive then its negatives."""
    b = len(batch.queries)
    k = len(batch.negatives) // b if b else 0
    queries, docs = [], []
    for i, q in enumerate(batch.queries):
        queries.extend([q] * (1 + k))
        docs.append(batch.positives[i])
        docs.extend(batch.negatives[i * k:(i + 1) * k])
    return queries, docs, 1 + k


class PairwiseTrainModule(nn.Module):
    """A pairwise reranker + loss: ``forward(features, group_size, labels?) -> loss``."""

    def __init__(self, reranker: RerankerBase, loss_fn: nn.Module):
        super().__init__()
        self.reranker = reranker
        self.loss_fn = loss_fn

    def forward(self, features: dict[str, torch.Tensor], group_size: int,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.reranker(**features)
        if labels is not None:  # scored records: pointwise
            return self.loss_fn(scores, labels)
        return self.loss_fn(scores.view(-1, group_size))


class PairwiseRerankerTask(RerankerTask):
    """A reranker that scores each (query, document) pair in one sequence (``reranker.features``)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.formats = ("triplet", "scored") if cfg.loss.name == "bce" else ("triplet",)

    def build(self, weights_from: str | None = None) -> nn.Module:
        return PairwiseTrainModule(self.build_reranker(weights_from), build_loss(self.cfg.loss))

    def inputs(self, module: nn.Module, batch: TextBatch) -> dict[str, Any]:
        reranker = module.reranker
        if batch.labels is not None:
            return {"features": reranker.features(batch.queries, batch.positives), "group_size": 1,
                    "labels": torch.tensor(batch.labels, dtype=torch.float32)}
        queries, docs, group = group_pairs(batch)
        if group < 2 and self.cfg.loss.name == "listwise":
            raise ValueError("listwise training needs hard negatives: triplet records and num_negatives >= 1")
        return {"features": reranker.features(queries, docs), "group_size": group}
