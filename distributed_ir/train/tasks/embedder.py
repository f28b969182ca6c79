"""Bi-encoder fine-tuning (task ``embedder``): queries and documents encoded by one
:class:`~distributed_ir.models.embedder.Embedder`, InfoNCE / triplet on pairs and triplets, CoSENT
on scored pairs, and distillation from teacher scores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_ir.config import ModelConfig, TrainConfig
from distributed_ir.config_loader import ConfigError
from distributed_ir.losses import build_distillation, build_loss
from distributed_ir.models.embedder import Embedder, resolve_model_path
from distributed_ir.models.lora import apply_lora
from distributed_ir.train.batching import TextBatch
from distributed_ir.train.tasks.base import TrainTask, enable_gradient_checkpointing


class EmbedderTrainModule(nn.Module):
    """Bi-encoder + loss in one forward (queries and documents encoded together): the contrastive
    ``loss_fn`` and/or ``distill_weight`` x the ``distill`` term against teacher scores.

    ``forward(encode=features)`` instead returns the embeddings of one chunk of tokenised texts:
    the cached-gradient step (:mod:`distributed_ir.train.grad_cache`) encodes through the DDP /
    DeepSpeed wrapper chunk by chunk and takes the loss from :meth:`loss_from_embeddings`.
    """

    def __init__(self, embedder: Embedder, loss_fn: nn.Module | None, distill: nn.Module | None = None,
                 distill_weight: float = 1.0):
        super().__init__()
        self.embedder = embedder
        self.loss_fn = loss_fn
        self.distill = distill
        self.distill_weight = distill_weight

    def forward(self, query: dict[str, torch.Tensor] | None = None, document: dict[str, torch.Tensor] | None = None,
                num_queries: int = 0, labels: torch.Tensor | None = None, teacher: torch.Tensor | None = None,
                encode: dict[str, torch.Tensor] | None = None, **keys: torch.Tensor) -> torch.Tensor:
        """``keys``: ``doc_keys`` / ``positive_keys`` for the loss's false-negative mask (infonce);
        ``teacher`` [B, 1+k]: the teacher's scores of each query's positive and negatives."""
        if encode is not None:
            return self.embedder(**encode)
        q = self.embedder(**query)
        d = self.embedder(**document)
        return self.loss_from_embeddings(q, d, num_queries, labels, teacher, **keys)

    def loss_from_embeddings(self, q: torch.Tensor, d: torch.Tensor, num_queries: int,
                             labels: torch.Tensor | None = None, teacher: torch.Tensor | None = None,
                             **keys: torch.Tensor) -> torch.Tensor:
        """The loss of query embeddings ``q`` [B, dim] and document embeddings ``d`` (positives,
        then the query-major negatives); cross-worker gathering happens inside the loss."""
        if labels is not None:
            return self.loss_fn(q, d, labels)
        positive, negative = d[:num_queries], d[num_queries:] if d.shape[0] > num_queries else None
        loss = self.loss_fn(q, positive, negative, **keys) if self.loss_fn is not None else 0.0
        if self.distill is not None:
            loss = loss + self.distill_weight * self.distill(q, positive, negative, teacher)
        return loss


class EmbedderTask(TrainTask):
    """Bi-encoder fine-tuning: InfoNCE / triplet on pairs and triplets, CoSENT on scored pairs."""

    name = "embedder"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.formats = {"cosent": ("scored",), "distill": ("triplet",)}.get(cfg.loss.name, ("pair", "triplet"))
        self.distills = build_distillation(cfg.loss) is not None

    def _embedder(self, weights_from: str | None) -> Embedder:
        model_cfg: ModelConfig = self.cfg.model
        if weights_from:
            model_cfg = replace(model_cfg, name_or_path=weights_from)
        embedder = Embedder.from_config(model_cfg)
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(embedder.backbone)
        if self.cfg.lora.enabled:
            embedder.backbone = apply_lora(embedder.backbone, self.cfg.lora, resolve_model_path(model_cfg.name_or_path))
        return embedder

    def build(self, weights_from: str | None = None) -> nn.Module:
        loss = self.cfg.loss
        return EmbedderTrainModule(self._embedder(weights_from), build_loss(loss), build_distillation(loss),
                                   loss.distill_weight if loss.name != "distill" else 1.0)

    def check_records(self, records: list, path: str) -> None:
        """Distillation needs every record's teacher scores and at least one negative per query."""
        if not self.distills:
            return
        if self.cfg.num_negatives < 1:
            raise ConfigError("distillation ranks each query's positive against its negatives: set num_negatives >= 1",
                              key="num_negatives")
        for n, rec in enumerate(records, 1):
            if getattr(rec, "scores", None) is None or not rec.negative:
                raise ValueError(f"{path}: record {n} has no {'scores' if rec.negative else 'negatives'}; "
                                 f"distillation (loss.name={self.cfg.loss.name}, distill_weight="
                                 f"{self.cfg.loss.distill_weight}) needs triplet records with teacher scores")

    def inputs(self, module: nn.Module, batch: TextBatch) -> dict[str, Any]:
        embedder: Embedder = module.embedder
        out: dict[str, Any] = {
            "query": embedder.tokenize(batch.queries, "query"),
            "document": embedder.tokenize(batch.positives + batch.negatives, "document",
                                          max_length=self.cfg.train_document_max_length or None),
            "num_queries": len(batch.queries),
        }
        if batch.labels is not None:
            out["labels"] = torch.tensor(batch.labels, dtype=torch.float32)
        elif self.cfg.loss.name == "infonce" and self.cfg.loss.mask_shared_positives:
            out.update(batch.key_tensors())
        if self.distills:
            out["teacher"] = torch.tensor(batch.teacher_scores, dtype=torch.float32)
        return out

    def export(self, module: nn.Module, path: Path) -> Path:
        embedder: Embedder = module.embedder
        if self.cfg.lora.enabled and self.cfg.lora.export == "merged":
            embedder.backbone = embedder.backbone.merge_and_unload()
        return embedder.save(path, extra={"trained_with": {"task": self.name, "engine": self.cfg.engine.name,
                                                           "lora": self.cfg.lora.enabled}})
