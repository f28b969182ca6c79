"""Distributed reranking evaluation: a TREC run's top-k rescored by a reranker with Ray Data.

    run.trec (top_k per query) + BEIR texts -> (query_id, doc_id, query, document) pairs,
    sorted by length -> Ray Data blocks -> map_batches(RerankStage, actor pool)
    -> scores -> reranked run.trec + metrics.json (before / after, pairs/s)

With a staged corpus (:class:`~distributed_ir.index.texts.StagedCorpus`, the pipeline's path) this
process builds the (query_id, doc_id, query) rows only: Ray tasks locate the documents in the
staged shards (their lengths order the rows as above), and each block's texts are attached on Ray
before the rerank actors, so the same blocks are scored. ``distributed-ir rerank``
(:func:`rerank_command`) stages the dataset's corpus so, and never loads it.

``RerankStage`` is a plain callable class (no Ray imports; unit tests call it directly): one
reranker per actor, length-sorted micro-batches inside each Ray batch, in the precision measured
fastest on the host that keeps the scores (``precision=auto``, :mod:`distributed_ir.models.precision`).  The pairs are sorted by text length before
they are split into blocks, so each actor's batches hold similar lengths and pad little.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from distributed_ir.eval.metrics import DEFAULT_METRICS, Run, evaluate, rank, read_run, write_run
from distributed_ir.index.texts import SCAN_CPUS, FoundTexts, StagedCorpus, attach_texts, check_qrels_staged
from distributed_ir.models.precision import (
    PrecisionChoice,
    PrecisionPolicy,
    collect_decisions,
    score_cosine,
    summarize_decisions,
)

STAGED_CORPUS = "staged_corpus"  # rerank_command's working copy of the corpus, inside its output folder


class RerankStage:
    """``__call__({"query", "document", ...}) -> {..., "score"}``; text columns are dropped.

    ``precision``: ``auto`` | ``fp32`` | ``bf16`` | ``bf16w`` | ``fp16`` | ``int8`` (cross-encoder, ColBERT) or a
    :class:`~distributed_ir.models.precision.PrecisionPolicy`; ``auto`` measures the candidates on
    the first pairs the stage sees (cached per host and model).  ``report_precision`` adds a
    ``precision_decision`` column (the decision's JSON on the first row returned, else ``""``)."""

    def __init__(self, model: str, batch_size: int = 32, precision: str | PrecisionPolicy = "auto",
                 device: str = "auto", threads: int = 0, compile: bool = False, report_precision: bool = False):

        from distributed_ir.index.encode import actor_device
        from distributed_ir.models.embedder import resolve_model_path
        from distributed_ir.models.rerankers import load_reranker

        self.device = actor_device(device, threads)
        model_dir = resolve_model_path(model)
        reranker = load_reranker(model_dir).to(self.device)
        reranker.eval()
        if compile:
            reranker.compile_backbone()
        self.batch_size = batch_size
        self.policy = PrecisionPolicy.of(precision)
        self.choice = PrecisionChoice(reranker, model_dir, self.device, self.policy,
                                      {"role": f"reranker-{reranker.kind}", "batch_size": batch_size,
                                       "compile": compile})
        self.report_precision = report_precision

    @property
    def reranker(self):
        """The reranker that runs: the torch model, its bfloat16 copy (bf16w) or its int8 ONNX Runtime copy."""
        return self.choice.model

    @property
    def dtype(self):
        return self.choice.dtype

    def score(self, queries: list[str], documents: list[str]) -> np.ndarray:
        if self.choice.pending and queries:  # auto: measure on the first pairs this stage sees
            n = self.policy.calibration_texts
            q, d = queries[:n], documents[:n]
            self.choice.calibrate(lambda model, dtype: model.score_pairs(q, d, self.batch_size, dtype), score_cosine)
        return self.reranker.score_pairs(queries, documents, batch_size=self.batch_size, dtype=self.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in batch.items() if k not in ("query", "document")}
        out["score"] = self.score([str(q) for q in batch["query"]], [str(d) for d in batch["document"]])
        if self.report_precision:
            out["precision_decision"] = self.choice.report_column(len(out["score"]))
        return out


def candidate_rows(run: Run, queries: dict[str, str], top_k: int) -> list[tuple[str, str]]:
    """``(query_id, doc_id)`` for each query's top_k (the ranking rule), queries of ``queries`` only."""
    return [(qid, doc) for qid, scores in run.items() if qid in queries for doc in rank(scores)[:top_k]]


def length_sorted(rows: list[tuple[str, str]], doc_length: Mapping[str, int],
                  queries: dict[str, str]) -> list[tuple[str, str]]:
    """``rows`` longest document first (similar lengths per batch), a document's pairs side by side:
    a reranker that encodes each document once per call (ColBERT) then encodes it once per block."""
    return sorted(rows, key=lambda r: (-doc_length[r[1]], r[1], -len(queries[r[0]])))


def candidate_pairs(run: Run, queries: dict[str, str], corpus: dict[str, str], top_k: int) -> dict[str, list]:
    """Columns of (query_id, doc_id, query, document) for each query's top_k, longest document first."""
    rows = candidate_rows(run, queries, top_k)
    for qid, doc in rows:
        if doc not in corpus:
            raise KeyError(f"run document {doc!r} (query {qid!r}) is not in the corpus")
    rows = length_sorted(rows, {d: len(corpus[d]) for _, d in rows}, queries)
    return {"query_id": [q for q, _ in rows], "doc_id": [d for _, d in rows],
            "query": [queries[q] for q, _ in rows], "document": [corpus[d] for _, d in rows]}


def staged_candidate_pairs(run: Run, queries: dict[str, str], corpus: StagedCorpus,
                           top_k: int) -> tuple[dict[str, list], FoundTexts]:
    """:func:`candidate_pairs` without the document texts: columns (query_id, doc_id, query) in the
    same order (the documents' lengths come from the staged corpus), and the located texts, which
    :func:`rerank_with_ray` attaches on Ray."""
    rows = candidate_rows(run, queries, top_k)
    found = corpus.find({d for _, d in rows})
    rows = length_sorted(rows, found.lengths, queries)
    return {"query_id": [q for q, _ in rows], "doc_id": [d for _, d in rows],
            "query": [queries[q] for q, _ in rows]}, found


def rerank_with_ray(model: str, pairs: dict[str, list], batch_size: int = 32, precision: str | PrecisionPolicy = "auto",
                    actors: int = 0, use_gpu: bool = False, compile: bool = False,
                    actor_start_timeout_s: float = 600, texts: FoundTexts | None = None
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores in ``pairs`` order, computed by a Ray Data actor pool; plus timing facts.

    ``pairs``: columns ``query`` and ``document``, or with ``texts`` (:func:`staged_candidate_pairs`)
    ``query`` and ``doc_id``: each block's documents are then attached on Ray
    (:func:`distributed_ir.index.texts.attach_texts`) before it reaches the rerank actors.

    The pool (:func:`distributed_ir.index.actors.actor_plan`) waits up to ``actor_start_timeout_s``
    for its first actor (a GPU the cluster does not have yet: an autoscaler may add it).

    ``compile``: each actor ``torch.compile``s its reranker (:meth:`RerankerBase.compile_backbone`);
    pays off on large reranks, where the compile is a small share of the run."""
    import pyarrow as pa
    import ray

    from distributed_ir.index.actors import actor_plan, starting_actors

    n = len(pairs["query_id"])
    ray_batch = batch_size * 4
    plan = actor_plan(use_gpu, actors, units=n // ray_batch + 1)
    second = "document" if texts is None else "doc_id"
    table = pa.table({"row": np.arange(n), "query": pairs["query"], second: pairs[second]})
    scores = np.full(n, np.nan, dtype=np.float32)
    decisions = []
    t0 = time.perf_counter()
    with starting_actors(plan, actor_start_timeout_s, "rerank"):
        # Contiguous blocks of the length-sorted pairs: similar lengths per block, several per actor.
        blocks = max(1, min(n // ray_batch + 1, 8 * plan.max_size))
        ds = ray.data.from_arrow(table).repartition(blocks)
        if texts is not None:  # whole blocks: the rerank actors get the blocks the text pairs would give
            ds = ds.map_batches(attach_texts, fn_kwargs={"refs": texts.refs}, batch_size=None,
                                batch_format="pyarrow", num_cpus=SCAN_CPUS)
        ds = ds.map_batches(RerankStage, fn_constructor_kwargs={"model": str(Path(model).resolve()),
                                                                "batch_size": batch_size, "precision": precision,
                                                                "device": plan.device, "threads": plan.threads,
                                                                "compile": compile, "report_precision": True},
                            batch_size=ray_batch, batch_format="numpy", **plan.map_kwargs())
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            scores[batch["row"]] = batch["score"]
            decisions += collect_decisions(batch["precision_decision"])
    seconds = time.perf_counter() - t0  # each actor reports its precision decision once: len = actors that ran
    if np.isnan(scores).any():
        raise RuntimeError(f"{int(np.isnan(scores).sum())} of {n} pairs came back without a score")
    return scores, {"pairs": n, "seconds": round(seconds, 2), "pairs_per_s": round(n / seconds, 1),
                    "actors": len(decisions), "max_actors": plan.max_size, "precision": summarize_decisions(PrecisionPolicy.of(precision).precision, decisions),
                    "compile": compile}


def rerank_run(model: str, run: Run, queries: dict[str, str], corpus: dict[str, str] | StagedCorpus, top_k: int,
               batch_size: int = 32, precision: str | PrecisionPolicy = "auto", actors: int = 0,
               use_gpu: bool = False, compile: bool = False) -> tuple[Run, Run, dict[str, Any]]:
    """Each query's top_k of ``run`` rescored with Ray Data: (reranked run, the first-stage
    top_k it reranked, speed facts). ``corpus``: the texts in this process, or a staged corpus
    whose texts only Ray workers read (the same pairs, order and scores)."""
    texts = None
    if isinstance(corpus, StagedCorpus):
        pairs, texts = staged_candidate_pairs(run, queries, corpus, top_k)
    else:
        pairs = candidate_pairs(run, queries, corpus, top_k)
    if not pairs["query_id"]:
        raise ValueError("no query of the run is among the given queries")
    scores, facts = rerank_with_ray(model, pairs, batch_size, precision, actors, use_gpu, compile=compile, texts=texts)
    reranked: Run = {}
    for qid, doc, s in zip(pairs["query_id"], pairs["doc_id"], scores):
        reranked.setdefault(qid, {})[doc] = float(s)
    # exactly the reranked candidates (a tie at rank top_k is cut as candidate_pairs cut it)
    first_stage = {q: {d: run[q][d] for d in docs} for q, docs in reranked.items()}
    return reranked, first_stage, facts


def rerank_command(model: str, run_path: str, dataset_dir: str, out: str, top_k: int = 100, split: str = "test",
                   batch_size: int = 32, precision: str | PrecisionPolicy = "auto", actors: int = 0,
                   use_gpu: bool = False, fuse: float | None = None, compile: bool = False) -> dict[str, Any]:
    """Rerank ``run_path``'s top_k; write ``out/run.trec`` and ``out/metrics.json``.

    The dataset's corpus is staged as the pipeline stages it (:func:`distributed_ir.stages.corpus_stage`)
    into ``out/staged_corpus`` (removed when the rerank ends) and the documents' texts are read
    from there on Ray (:func:`rerank_run` with a :class:`StagedCorpus`), where the qrels' document
    ids are checked too: this process reads the queries and qrels only. On a multi-node cluster ``out`` must be storage every node can read.

    ``fuse=w`` also writes ``out/run_fused.trec`` (:func:`distributed_ir.eval.fusion.fuse_runs`,
    weight ``w`` on the reranker) and a ``fused`` metrics row."""
    from distributed_ir.config import EvalConfig, InputConfig
    from distributed_ir.data.beir import load_beir
    from distributed_ir.stages import corpus_stage

    ds = load_beir(dataset_dir, split, corpus=False)  # queries and qrels; the corpus: staged, read on Ray
    run = read_run(run_path)
    queries = ds.split_queries()
    if not any(scores and qid in queries for qid, scores in run.items()):
        raise ValueError(f"{run_path}: no query of the run is in {dataset_dir} split {split!r}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # a staging that fails leaves no staged corpus behind either
        staged = corpus_stage(Path(dataset_dir) / "corpus.jsonl", out_dir / STAGED_CORPUS, EvalConfig(), InputConfig())
        check_qrels_staged([ds], staged.texts)  # the qrels' document ids, on the staged shards
        reranked, first_stage, facts = rerank_run(model, run, queries, staged.texts, top_k, batch_size, precision,
                                                  actors, use_gpu, compile=compile)
    finally:
        shutil.rmtree(out_dir / STAGED_CORPUS, ignore_errors=True)
    write_run(out_dir / "run.trec", reranked, tag="distributed-ir-rerank")
    report = {
        "model": str(model), "run": str(run_path), "dataset": str(dataset_dir), "split": split, "top_k": top_k,
        "first_stage": evaluate(first_stage, ds.qrels, DEFAULT_METRICS),
        "reranked": evaluate(reranked, ds.qrels, DEFAULT_METRICS),
        "speed": facts,
    }
    if fuse is not None:
        from distributed_ir.eval.fusion import fuse_runs

        fused = fuse_runs(first_stage, reranked, fuse)
        write_run(out_dir / "run_fused.trec", fused, tag="distributed-ir-fused")
        report["fusion_weight"] = fuse
        report["fused"] = evaluate(fused, ds.qrels, DEFAULT_METRICS)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
