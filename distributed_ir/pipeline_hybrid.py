"""Pipeline rows for the sparse first stage: ``bm25`` (BM25 alone, before any training) and
``hybrid`` (the fine-tuned dense run fused with BM25; with ``hybrid.rerank`` it is the candidate set
the reranker stage reranks).  Writes ``OUT/run_bm25.trec`` and ``OUT/run_hybrid.trec``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distributed_ir.config import HybridConfig
from distributed_ir.data.beir import BeirDataset
from distributed_ir.eval.fusion import hybrid_runs
from distributed_ir.eval.metrics import DEFAULT_METRICS, Run, evaluate, rank, write_run
from distributed_ir.index.bm25 import BM25Settings, search_staged
from distributed_ir.index.retrieve import CorpusIndex
from distributed_ir.stages import CorpusStage, eval_queries
from distributed_ir.train.launch import init_ray


def bm25_row(cfg: HybridConfig, ds: BeirDataset, corpus: CorpusStage | CorpusIndex, top_k: int, max_queries: int,
             out: Path, report: dict[str, Any]) -> tuple[dict[str, float], Run]:
    """BM25 over the staged ``corpus`` (index shards built and searched in Ray tasks, each from its
    staged corpus shards), the eval queries searched, evaluated; the run goes to ``run_bm25.trec``."""
    init_ray()
    timings: list[dict[str, float]] = []
    run = search_staged(corpus.path, eval_queries(ds, max_queries), top_k, BM25Settings(k1=cfg.k1, b=cfg.b),
                        shards=cfg.shards, timings=timings)
    write_run(out / "run_bm25.trec", run, tag="distributed-ir-bm25")
    # shards build and search in parallel: the slowest one's seconds
    report["bm25"] = {**{k: round(max(t[k] for t in timings), 1) for k in ("index_seconds", "search_seconds")},
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
