"""The retrieval core: a corpus encoded into an index folder by Ray Data actors, queries encoded
and searched by Ray Data actors, hits ordered by the one ranking rule.

    index_corpus(model, corpus, out)  -> CorpusIndex   (``distributed-ir index``'s path: encode actors
                                                        write their own shards, FAISS parts built in Ray tasks)
    search_queries(index, queries, k) -> Run           (query batches over an actor pool; each actor
                                                        holds the query encoder and either the index
                                                        parts or handles to per-part searcher actors)

Used by the pipeline (base eval, mining, fine-tuned eval, the reranker stage's mining), by
``distributed-ir mine`` and ``distributed-ir search``; the LangChain retriever searches in its own
process with the same searcher (:class:`distributed_ir.index.parts.PartSearcher`). The driver
builds no model and receives no vector: it gets shard metadata from the encoders and each query's
top-k ids and scores from the query actors. A :class:`CorpusIndex` is what stages hand on (a
folder and facts, never vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from distributed_ir.data.intake import MAX_TEXT_BYTES
from distributed_ir.eval.metrics import Run, rank
from distributed_ir.index.storage import Location
from distributed_ir.models.precision import PrecisionPolicy, collect_decisions


@dataclass(frozen=True)
class CorpusIndex:
    """A corpus encoded by ``model`` into the index folder ``path`` (manifest, shards, FAISS parts)."""

    path: str
    model: str
    num_docs: int
    encode_seconds: float
    docs_per_s: float  # nan when every shard was reused from an earlier run of the same model


def index_corpus(model: str, corpus: str | list[str], out: str, batch_size: int = 64, precision: str = "fp32",
                 num_shards: int = 4, actors: int = 0, use_gpu: bool = False, factory: str = "Flat",
                 on_error: str = "raise", rejects_path: str = "", max_text_bytes: int = MAX_TEXT_BYTES,
                 index_shards: int = 1) -> CorpusIndex:
    """Encode ``corpus`` (BEIR JSONL / Parquet files) with ``model`` on Ray Data actors into ``out``
    and build its FAISS index (``index_shards`` parts, each built by its own Ray task, so no process
    holds every vector): ``distributed-ir index`` with these options."""
    from distributed_ir.index.pipeline import IndexOptions, build_faiss, encode_corpus

    opts = IndexOptions(model=model, corpus=corpus, out=out, index_type=factory, num_shards=num_shards,
                        batch_size=batch_size, precision=precision, use_gpu=use_gpu, actors=actors, on_error=on_error,
                        rejects_path=rejects_path, max_text_bytes=max_text_bytes)
    manifest = encode_corpus(opts, progress=False)
    build_faiss(out, manifest, factory, index_shards, use_gpu)
    last = manifest["last_run"]
    return CorpusIndex(path=out, model=manifest["model"], num_docs=int(manifest["num_docs"]),
                       encode_seconds=float(last["seconds"]), docs_per_s=float(last["docs_per_s"] or "nan"))


class QuerySearchStage:
    """``__call__({"query_id", "text"}) -> Arrow table (query_id, doc_ids, scores)`` (no Ray imports).

    Loads the model that built the index once per actor (the query settings saved with it) and
    either the index parts themselves or, given ``searchers`` (per-part searcher actor handles,
    :mod:`distributed_ir.index.searchers`), none: each encoded batch then goes to every searcher and
    their top-k lists are merged. Either way each row's hits are what
    :func:`distributed_ir.index.parts.search_hits` gives over every part, ordered by
    :func:`distributed_ir.eval.metrics.rank` (fewer than ``top_k`` when the index is smaller).
    """

    def __init__(self, index_dir: str, top_k: int, batch_size: int = 64, precision: str | PrecisionPolicy = "auto",
                 device: str = "cpu", threads: int = 0, report_precision: bool = False, searchers: list | None = None):
        from distributed_ir.index.encode import EncodeStage
        from distributed_ir.index.parts import PartSearcher
        from distributed_ir.index.pipeline import MANIFEST
        from distributed_ir.index.searchers import RemoteParts

        root = Location(index_dir)
        manifest = root.read_json(MANIFEST)
        self.encoder = EncodeStage(manifest["model"], kind="query", batch_size=batch_size, precision=precision,
                                   device=device, threads=threads)
        self.searcher = RemoteParts(searchers) if searchers else PartSearcher(root.child("index"),
                                                                              use_gpu=device != "cpu")
        self.top_k = top_k
        self.report_precision = report_precision

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from distributed_ir.index.parts import hit_dicts

        vectors = self.encoder.encode([str(t) for t in batch["text"]])
        hits = hit_dicts(self.searcher.search(vectors, self.top_k))
        ids = [rank(h) for h in hits]
        # list<string> / list<double> Arrow columns: Ray stores them natively (object arrays are pickled)
        columns = {"query_id": pa.array([str(q) for q in batch["query_id"]], pa.string()),
                   "doc_ids": pa.array(ids, pa.list_(pa.string())),
                   "scores": pa.array([[h[d] for d in r] for h, r in zip(hits, ids)], pa.list_(pa.float64()))}
        if self.report_precision:  # the query encoder's precision decision, on the first row returned
            columns["precision_decision"] = pa.array(self.encoder.choice.report_column(len(ids)).tolist(), pa.string())
        return pa.table(columns)


def search_queries(index_dir: str, queries: dict[str, str], top_k: int, batch_size: int = 64,
                   precision: str | PrecisionPolicy = "auto", actors: int = 0, use_gpu: bool = False,
                   decisions: list[dict[str, Any]] | None = None, actor_start_timeout_s: float = 600,
                   searchers: int = 0, searcher_gpus: float = 0.0,
                   searcher_stats: list[dict[str, Any]] | None = None) -> Run:
    """``{qid: {doc_id: score}}``: the top ``top_k`` of every query, query batches encoded by a Ray
    Data actor pool (:func:`distributed_ir.index.actors.actor_plan`: ``actors`` fixed, else one
    up to one per query batch, waiting up to ``actor_start_timeout_s`` for resources an autoscaler
    may add) and searched on the index parts.

    ``searchers``: per-part searcher actors (:mod:`distributed_ir.index.searchers`), each holding
    a group of consecutive parts; 0 = one per part. An index of one part (or ``searchers=1``) is
    held by each query actor instead. ``searcher_gpus``: GPUs each searcher asks for (0: CPU FAISS).
    The query actors' precision decisions are appended to ``decisions`` and each searcher's
    :meth:`~distributed_ir.index.parts.PartSearcher.held` to ``searcher_stats`` when given.
    Raises when a query comes back without its row."""
    import ray

    from distributed_ir.index.actors import actor_plan, starting_actors
    from distributed_ir.index.searchers import part_searchers, searcher_groups

    qids = list(queries)
    if not qids:
        return {}
    plan = actor_plan(use_gpu, actors, units=math.ceil(len(qids) / batch_size))
    table = pa.table({"query_id": qids, "text": [queries[q] for q in qids]})
    # blocks cut here, not by repartition: no Ray Data task has to find a CPU beside the actors
    step = math.ceil(len(qids) / max(1, min(len(qids), 4 * plan.max_size)))
    blocks = [table.slice(i, step) for i in range(0, len(qids), step)]
    groups = searcher_groups(index_dir, searchers)
    run: Run = {}
    with (part_searchers(index_dir, groups, searcher_gpus, actor_start_timeout_s, searcher_stats) as handles,
          starting_actors(plan, actor_start_timeout_s, "query search")):
        ds = ray.data.from_arrow(blocks).map_batches(QuerySearchStage, fn_constructor_kwargs={
            "index_dir": str(index_dir), "top_k": top_k, "batch_size": batch_size, "precision": precision,
            "device": plan.device, "threads": plan.threads, "report_precision": decisions is not None,
            "searchers": handles}, batch_size=batch_size, batch_format="numpy", **plan.map_kwargs())
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pydict()
            for qid, ids, scores in zip(rows["query_id"], rows["doc_ids"], rows["scores"]):
                run[qid] = dict(zip(ids, scores))
            if decisions is not None:
                decisions += collect_decisions(rows["precision_decision"])
    missing = [q for q in qids if q not in run]
    if missing:
        raise RuntimeError(f"{len(missing)} queries came back without results, e.g. {missing[:3]}")
    return {q: run[q] for q in qids}  # query-file order, as the TREC runs were written before


def ranked_ids(run: Run) -> dict[str, list[str]]:
    """Run -> doc ids best first by the ranking rule (what mining windows cut)."""
    return {q: rank(s) for q, s in run.items()}
