"""The reranker registry: kind name -> class, and :func:`load_reranker` for a saved folder.

Apart from :mod:`distributed_ir.models.reranker_base` (the base class every reranker imports) so
that the base never imports its subclasses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed_ir.models.colbert import ColBERTReranker
from distributed_ir.models.cross_encoder import CrossEncoderReranker
from distributed_ir.models.llm_reranker import LLMReranker
from distributed_ir.models.reranker_base import RerankerBase, read_settings
from distributed_ir.models.settings import SETTINGS_FILE

RERANKER_CLASSES: dict[str, type[RerankerBase]] = {
    cls.kind: cls for cls in (CrossEncoderReranker, ColBERTReranker, LLMReranker)}


def load_reranker(path: str | Path, **kwargs: Any) -> RerankerBase:
    """Load whichever reranker ``path`` holds (its ``distributed_ir.json`` names the kind)."""
    saved = read_settings(path)
    if saved is None:
        raise ValueError(f"{path}: no {SETTINGS_FILE} with a 'reranker' section; load a plain Hugging Face "
                         "model with CrossEncoderReranker/ColBERTReranker/LLMReranker.from_pretrained")
    kind = saved[0]
    if kind not in RERANKER_CLASSES:
        raise ValueError(f"{Path(path) / SETTINGS_FILE}: reranker kind {kind!r}; expected one of "
                         f"{', '.join(RERANKER_CLASSES)}")
    return RERANKER_CLASSES[kind].load(path, **kwargs)
