"""Pipeline rows for the sparse first stage: ``bm25`` (BM25 alone, before any training) and
``hybrid`` (the fine-tuned dense run fused with BM25; with ``hybrid.rerank`` it is the candidate set
the reranker stage reranks).  Writes ``OUT/run_bm25.trec`` and ``OUT/run_hybrid.trec``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distributed_ir.config import HybridConfig
from distributed_ir.data.beir import BeirDataset
from distributed_ir.eval.fusion import hybrid_runs
from distributed_ir.eval.metrics import DEFAULT_METRICS, Run, evaluate, rank, write_run
from distributed_ir.index.bm25 import BM25Index, BM25Settings
from distributed_ir.stages import eval_queries


def bm25_row(cfg: HybridConfig, ds: BeirDataset, top_k: int, max_queries: int, out: Path,
             report: dict[str, Any]) -> tuple[dict[str, float], Run]:
    """Index the corpus with BM25, search the eval queries, evaluate; the run goes to ``run_bm25.trec``."""
    t0 = time.perf_counter()
    index = BM25Index.build(ds.corpus, BM25Settings(k1=cfg.k1, b=cfg.b), shards=cfg.shards)
    built = time.perf_counter() - t0
    run = index.search(eval_queries(ds, max_queries), top_k)
    write_run(out / "run_bm25.trec", run, tag="distributed-ir-bm25")
    report["bm25"] = {"index_seconds": round(built, 1), "search_seconds": round(time.perf_counter() - t0 - built, 1),
                      "k1": cfg.k1, "b": cfg.b, "shards": cfg.shards}
    return evaluate(run, ds.qrels, DEFAULT_METRICS), run


def hybrid_row(cfg: HybridConfig, dense: Run, sparse: Run, ds: BeirDataset, top_k: int, out: Path,
               report: dict[str, Any]) -> tuple[dict[str, float], Run]:
    """Fuse the dense run with BM25's, keep each query's top ``top_k``; ``run_hybrid.trec``."""
    fused = hybrid_runs(dense, sparse, cfg.weight, cfg.method, cfg.rrf_k)
    fused = {q: {d: s[d] for d in rank(s)[:top_k]} for q, s in fused.items()}
    write_run(out / "run_hybrid.trec", fused, tag="distributed-ir-hybrid")
    report["hybrid"] = {"weight": cfg.weight, "method": cfg.method, "rrf_k": cfg.rrf_k, "rerank": cfg.rerank}
    return evaluate(fused, ds.qrels, DEFAULT_METRICS), fused
