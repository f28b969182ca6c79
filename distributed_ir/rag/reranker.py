"""What the RAG code needs from a reranker: one method, no base class to inherit."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Reranker(Protocol):
    """Anything that scores documents against a query (cross-encoders, LLM rerankers, ...).

    ``score(query, documents)`` returns one float per document, higher = more relevant, in the
    order given. Scores only need to be comparable within one call.
    """

    def score(self, query: str, documents: list[str]) -> list[float]: ...
