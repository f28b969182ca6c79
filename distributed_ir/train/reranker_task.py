"""Training tasks for the three rerankers: ``cross_encoder``, ``colbert``, ``llm_reranker``.

They plug into the same loop, engines (DDP | DeepSpeed), checkpoints and Ray Train launch as
the embedder (:mod:`distributed_ir.train.tasks`).  Batches come from triplet records: query i
has one positive and ``num_negatives`` hard negatives (negatives query-major).

- cross-encoder / LLM: the group of query i is ``[positive_i, negative_i1 .. negative_ik]``
  (row ``i*(1+k) + j``), scored in one forward; loss ``listwise`` (softmax CE over the group,
  positive first) or ``bce`` (pointwise, column 0 labelled 1).  ``bce`` also takes scored
  records (query, document, label in [0, 1]).
- ColBERT: every query against every document of the worker's batch (positives then hard
  negatives) with ``listwise`` CE, target = the query's own positive (in-batch + hard
  negatives).  Token vectors vary in length, so negatives are not gathered across workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import ConfigError
from distributed_ir.losses import build_loss
from distributed_ir.losses.false_negatives import shared_positive_mask
from distributed_ir.models.colbert import ColBERTReranker
from distributed_ir.models.cross_encoder import CrossEncoderReranker
from distributed_ir.models.llm_reranker import LLMReranker
from distributed_ir.models.rerankers import RERANKER_CLASSES
from distributed_ir.models.reranking import DEFAULT_LLM_PROMPT, RerankerSettings
from distributed_ir.train.batching import TextBatch
from distributed_ir.train.tasks import TrainTask, register_task


def reranker_settings(cfg: TrainConfig, kind: str) -> RerankerSettings:
    r = cfg.reranker
    return RerankerSettings(kind=kind, max_length=r.max_length, query_max_length=r.query_max_length,
                            document_max_length=r.document_max_length, max_chunks=r.max_chunks,
                            chunk_overlap=r.chunk_overlap, colbert_dim=r.colbert_dim,
                            prompt=r.prompt or DEFAULT_LLM_PROMPT)


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
    """Cross-encoder or LLM reranker + loss: ``forward(features, group_size, labels?) -> loss``."""

    def __init__(self, reranker: CrossEncoderReranker | LLMReranker, loss_fn: nn.Module):
        super().__init__()
        self.reranker = reranker
        self.loss_fn = loss_fn

    def forward(self, features: dict[str, torch.Tensor], group_size: int,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.reranker(**features)
        if labels is not None:  # scored records: pointwise
            return self.loss_fn(scores, labels)
        return self.loss_fn(scores.view(-1, group_size))


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


class RerankerTask(TrainTask):
    """One task class for the three kinds; ``name`` selects the model class."""

    def __init__(self, cfg: TrainConfig, kind: str):
        super().__init__(cfg)
        self.name = kind
        if kind == "colbert":
            self.formats = ("pair", "triplet")
        else:
            self.formats = ("triplet", "scored") if cfg.loss.name == "bce" else ("triplet",)
        if cfg.lora.enabled and kind != "llm_reranker":
            raise ConfigError(f"lora is supported for task=llm_reranker, not {kind}")
        if cfg.lora.enabled and cfg.lora.export != "merged":
            raise ConfigError("llm_reranker exports merged weights: set lora.export=merged")

    def _model(self, weights_from: str | None) -> Any:
        cls = RERANKER_CLASSES[self.name]
        settings = reranker_settings(self.cfg, self.name)
        model = cls.from_pretrained(weights_from or self.cfg.model.name_or_path, settings=settings,
                                    trust_remote_code=self.cfg.model.trust_remote_code)
        inner = model.lm if self.name == "llm_reranker" else (model.model if self.name == "cross_encoder"
                                                              else model.backbone)
        if self.cfg.gradient_checkpointing:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner.config.use_cache = False
        if self.cfg.lora.enabled:
            model.attach_lora(self.cfg.lora)
        return model

    def build(self, weights_from: str | None = None) -> nn.Module:
        model = self._model(weights_from)
        loss_fn = build_loss(self.cfg.loss)
        if self.name == "colbert":
            return ColBERTTrainModule(model, loss_fn)
        return PairwiseTrainModule(model, loss_fn)

    def inputs(self, module: nn.Module, batch: TextBatch) -> dict[str, Any]:
        reranker = module.reranker
        if self.name == "colbert":
            q = reranker.tokenizer(batch.queries, truncation=True, max_length=reranker.settings.query_max_length,
                                   padding=True, return_tensors="pt")
            d = reranker.tokenizer(batch.positives + batch.negatives, truncation=True,
                                   max_length=reranker.settings.document_max_length, padding=True, return_tensors="pt")
            pick = ("input_ids", "attention_mask")
            keys = batch.key_tensors() if self.cfg.loss.mask_shared_positives else {}
            return {"query": {k: q[k] for k in pick}, "document": {k: d[k] for k in pick}, **keys}
        if batch.labels is not None:
            return {"features": reranker.features(batch.queries, batch.positives), "group_size": 1,
                    "labels": torch.tensor(batch.labels, dtype=torch.float32)}
        queries, docs, group = group_pairs(batch)
        if group < 2 and self.cfg.loss.name == "listwise":
            raise ValueError("listwise training needs hard negatives: triplet records and num_negatives >= 1")
        return {"features": reranker.features(queries, docs), "group_size": group}

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        trainable = [p for p in module.parameters() if p.requires_grad]
        if self.name == "llm_reranker" or not self.cfg.reranker.head_lr:
            return [{"params": trainable}]
        head = {id(p) for p in module.reranker.head_parameters()}
        return [{"params": [p for p in trainable if id(p) not in head]},
                {"params": [p for p in trainable if id(p) in head], "lr": self.cfg.reranker.head_lr}]

    def export(self, module: nn.Module, path: Path) -> Path:
        return module.reranker.save(path)


for _kind in RERANKER_CLASSES:
    register_task(_kind, lambda cfg, kind=_kind: RerankerTask(cfg, kind))


def reranker_train_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` if it trains a reranker (its loss defaults were set by the task, see ``LOSS_DEFAULTS``)."""
    if cfg.task not in RERANKER_CLASSES:
        raise ConfigError(f"train reranker: task={cfg.task!r}; expected one of {', '.join(RERANKER_CLASSES)}")
    return cfg
