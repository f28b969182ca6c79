"""Cross-encoder reranker: ``AutoModelForSequenceClassification`` (one logit) over any HF encoder.

The input is the tokenizer's own pair encoding (``[CLS] query [SEP] document [SEP]`` for BERT)
truncated ``longest_first`` to ``max_length`` — exactly what sentence-transformers'
``CrossEncoder`` does — and the score is the raw logit.  ``save`` writes a plain Hugging Face
folder whose config tells sentence-transformers to apply no activation, and whose tokenizer
carries ``model_max_length = max_length``, so ``CrossEncoder(path).predict(pairs)`` returns
the same scores as :meth:`CrossEncoderReranker.score_pairs` (tested).

Long documents (``max_chunks > 1``): the query (cut to ``query_max_length`` tokens) is paired
with overlapping windows of the document (``truncation="only_second"``, ``stride`` =
``chunk_overlap``, the tokenizer's overflow mechanism), score = max over windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distributed_ir.models.reranker_base import RerankerBase, load_hf, write_settings
from distributed_ir.models.settings import RerankerSettings

ST_IDENTITY = "torch.nn.modules.linear.Identity"


class CrossEncoderReranker(RerankerBase):
    """``forward(**features) -> [batch]`` logits; ``score(query, documents)`` for inference."""

    kind = "cross_encoder"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: RerankerSettings):
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(f"a cross-encoder needs num_labels=1, the model has {model.config.num_labels}")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, settings: RerankerSettings | None = None,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                        **overrides: Any) -> CrossEncoderReranker:
        """A HF encoder (a new head is initialised) or a saved cross-encoder (its settings apply)."""
        from transformers import AutoModelForSequenceClassification

        _, settings, tokenizer, model = load_hf(AutoModelForSequenceClassification, name_or_path, settings, dtype,
                                                trust_remote_code, overrides, num_labels=1)
        return cls(model, tokenizer, settings)

    def save(self, path: str | Path) -> Path:
        """HF folder loadable by ``CrossEncoder(path)`` with identical scores, plus our settings."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.model.config
        # sentence-transformers reads its activation from here; logits are our scores.
        cfg.sentence_transformers = {"activation_fn": ST_IDENTITY}
        self.model.save_pretrained(path, safe_serialization=True)
        max_len = self.tokenizer.model_max_length
        self.tokenizer.model_max_length = self.settings.max_length  # CrossEncoder truncates at this
        self.tokenizer.save_pretrained(path)
        self.tokenizer.model_max_length = max_len
        write_settings(path, self.kind, self.settings, {"similarity": "logit"})
        return path

    def head_parameters(self) -> list[torch.nn.Parameter]:
        """The scoring head on top of the encoder (``classifier`` and, for BERT, ``pooler``):
        new when the backbone was a plain encoder, so it may train with its own learning rate."""
        backbone = getattr(self.model, self.model.base_model_prefix, None)
        heads = [getattr(self.model, "classifier", None), getattr(self.model, "score", None),
                 getattr(backbone, "pooler", None)]
        return [p for m in heads if m is not None for p in m.parameters()]

    # ------------------------------------------------------------------ features
    def _cut_queries(self, queries: list[str]) -> list[str]:
        """Queries longer than ``query_max_length`` tokens are cut at a token boundary."""
        limit = self.settings.query_max_length
        enc = self.tokenizer(queries, add_special_tokens=False, return_offsets_mapping=True)
        return [q if len(offs) <= limit else q[:offs[limit - 1][1]] for q, offs in zip(queries, enc["offset_mapping"])]

    def build_units(self, queries: Sequence[str], documents: Sequence[str]) -> tuple[list[dict], list[int]]:
        s = self.settings
        if s.max_chunks == 1:
            enc = self.tokenizer(list(queries), list(documents), truncation=True, max_length=s.max_length)
            owners = list(range(len(queries)))
        else:
            # The tokenizer needs stride < the room left for the document; keep at most half of it.
            stride = min(s.chunk_overlap, max(0, (s.max_length - s.query_max_length - 4) // 2))
            enc = self.tokenizer(self._cut_queries(list(queries)), list(documents), truncation="only_second",
                                 max_length=s.max_length, stride=stride, return_overflowing_tokens=True)
            owners, seen, keep = [], {}, []
            for i, owner in enumerate(enc["overflow_to_sample_mapping"]):
                seen[owner] = seen.get(owner, 0) + 1
                if seen[owner] <= s.max_chunks:
                    keep.append(i)
                    owners.append(int(owner))
            enc = {k: [enc[k][i] for i in keep] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(owners))], owners

    def collate(self, units: list[dict]) -> dict[str, torch.Tensor]:
        """Pad units into model inputs (the tokenizer's padding side and pad id)."""
        padded = self.tokenizer.pad({k: [u[k] for u in units] for k in units[0]}, padding=True, return_tensors="pt")
        return dict(padded.items())

    def features(self, queries: Sequence[str], documents: Sequence[str]) -> dict[str, torch.Tensor]:
        """CPU model inputs for training: one row per pair, truncated (training pairs are short)."""
        enc = self.tokenizer(list(queries), list(documents), truncation=True, max_length=self.settings.max_length,
                             padding=True, return_tensors="pt")
        return dict(enc.items())

    # ------------------------------------------------------------------ int8 (ONNX Runtime) body
    onnx_body = ("model", "logits")  # the whole classifier: its logits are the scores

    def onnx_example(self) -> dict[str, torch.Tensor]:
        """A padded batch of two (query, document) pairs, for tracing the model."""
        from distributed_ir.models.onnx_int8 import EXAMPLE_TEXTS

        units, _ = self.build_units(["a query"] * 2, list(EXAMPLE_TEXTS))
        return self.collate(units)

    def with_body(self, body: torch.nn.Module) -> CrossEncoderReranker:
        return CrossEncoderReranker(body, self.tokenizer, self.settings)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.squeeze(-1)

    def score_units(self, units: list[dict]) -> torch.Tensor:
        return self(**{k: v.to(self.device) for k, v in self.collate(units).items()})
