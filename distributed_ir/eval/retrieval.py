"""In-process retrieval evaluation: encode corpus + queries, FAISS flat inner product, metrics.

This is the single-process path (one model, this machine); the Ray Data indexing pipeline
replaces the corpus encode for large corpora.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from distributed_ir.data.beir import BeirDataset
from distributed_ir.eval.metrics import DEFAULT_METRICS, Run, evaluate, rank
from distributed_ir.models.embedder import Embedder


@dataclass
class CorpusIndex:
    doc_ids: list[str]
    index: object  # faiss.Index
    encode_seconds: float


def build_flat_index(embedder: Embedder, corpus: dict[str, str], batch_size: int = 64, bf16: bool = False,
                     progress: bool = True) -> CorpusIndex:
    """Encode every document and put it in a FAISS ``IndexFlatIP`` (exact search)."""
    import faiss

    doc_ids = list(corpus)
    t0 = time.perf_counter()
    vectors = embedder.encode([corpus[d] for d in doc_ids], "document", batch_size, bf16, progress)
    seconds = time.perf_counter() - t0
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return CorpusIndex(doc_ids=doc_ids, index=index, encode_seconds=seconds)


def search(embedder: Embedder, index: CorpusIndex, queries: dict[str, str], top_k: int = 100,
           batch_size: int = 64, bf16: bool = False) -> Run:
    """Top-k documents per query as a run ``{qid: {doc_id: score}}``."""
    qids = list(queries)
    vectors = embedder.encode([queries[q] for q in qids], "query", batch_size, bf16)
    k = min(top_k, len(index.doc_ids))
    scores, idx = index.index.search(vectors, k)
    return {
        qid: {index.doc_ids[j]: float(s) for s, j in zip(scores[row], idx[row]) if j >= 0}
        for row, qid in enumerate(qids)
    }


def evaluate_model(embedder: Embedder, ds: BeirDataset, top_k: int = 100, batch_size: int = 64, bf16: bool = False,
                   max_queries: int = 0, index: CorpusIndex | None = None) -> tuple[dict[str, float], Run, CorpusIndex]:
    """Encode (unless ``index`` is given), search the split's queries and compute metrics."""
    index = index or build_flat_index(embedder, ds.corpus, batch_size, bf16)
    queries = ds.split_queries()
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    run = search(embedder, index, queries, top_k, batch_size, bf16)
    metrics = evaluate(run, ds.qrels, DEFAULT_METRICS)
    metrics["encode_docs_per_s"] = len(index.doc_ids) / index.encode_seconds if index.encode_seconds else float("nan")
    return metrics, run, index


def ranked_ids(run: Run) -> dict[str, list[str]]:
    """Run -> doc ids best first (for hard-negative mining), ties as evaluation breaks them (:func:`rank`)."""
    return {q: rank(s) for q, s in run.items()}

