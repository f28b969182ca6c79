"""The reranker registry: kind name -> class, and :func:`load_reranker` for a saved folder.

Lives apart from :mod:`distributed_ir.models.reranking` (the base class every reranker imports) so
that the base never imports its subclasses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed_ir.config_loader import ConfigError
from distributed_ir.models.colbert import ColBERTReranker
from distributed_ir.models.cross_encoder import CrossEncoderReranker
from distributed_ir.models.llm_reranker import LLMReranker
from distributed_ir.models.reranking import SETTINGS_FILE, RerankerBase, read_settings

RERANKER_CLASSES: dict[str, type[RerankerBase]] = {
    "cross_encoder": CrossEncoderReranker, "colbert": ColBERTReranker, "llm_reranker": LLMReranker}


def load_reranker(path: str | Path, **kwargs: Any) -> RerankerBase:
    """Load whichever reranker ``path`` holds (its ``distributed_ir.json`` names the kind)."""
    settings = read_settings(path)
    if settings is None:
        raise ConfigError(f"{path}: no {SETTINGS_FILE} with a 'reranker' section; load a plain Hugging Face "
                          "model with CrossEncoderReranker/ColBERTReranker/LLMReranker.from_pretrained")
    return RERANKER_CLASSES[settings.kind].load(path, **kwargs)
