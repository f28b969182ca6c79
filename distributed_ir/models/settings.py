"""What a saved model folder says about itself: the settings file name (embedders and rerankers
alike) and the rerankers' settings.

Standard library only: the app's config (:mod:`distributed_ir.config`) builds its ``reranker:``
section on :class:`RerankerSettings` and imports this module, so it must stay light and never
import the config back.  Bad values raise ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Self

SETTINGS_FILE = "distributed_ir.json"
DEFAULT_LLM_PROMPT = (
    "Given a query with a relevant body, determine whether the document is pertinent to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class RerankerSettings:
    """Saved beside a reranker's weights (``distributed_ir.json``) so scoring always matches training.

    The reranker's kind is not a setting: it is the class (``CrossEncoderReranker.kind``), written
    beside these fields in the file."""

    max_length: int = _help("cross-encoder / LLM: max tokens of the whole (query, document) input", 512)
    query_max_length: int = _help("max query tokens (ColBERT; others cut long queries to this when chunking)", 64)
    document_max_length: int = _help("ColBERT: max document tokens per chunk", 256)
    max_chunks: int = _help("1 = truncate long documents; N > 1 = score up to N overlapping chunks, keep the max", 1)
    chunk_overlap: int = _help("tokens shared by consecutive chunks", 64)
    colbert_dim: int = _help("ColBERT head width (a colbert_linear.pt in the model folder decides instead)", 128)
    prompt: str = _help("LLM reranker instruction, read after the document ('' = the default Yes/No prompt)",
                        DEFAULT_LLM_PROMPT)

    def __post_init__(self) -> None:
        for name in ("max_length", "query_max_length", "document_max_length", "max_chunks", "colbert_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"reranker.{name}={getattr(self, name)}: must be >= 1")
        if self.chunk_overlap < 0:
            raise ValueError(f"reranker.chunk_overlap={self.chunk_overlap}: must be >= 0")
        if not self.prompt:
            self.prompt = DEFAULT_LLM_PROMPT

    @classmethod
    def of(cls, settings: RerankerSettings) -> Self:
        """Exactly these settings of ``settings`` (an app config that extends them, e.g. with a
        training learning rate, keeps its own fields out of the saved model)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})
