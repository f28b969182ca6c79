"""The pipeline's reranker stage end to end on a real local Ray cluster: BM25 row -> fine-tune a tiny
BERT embedder -> hybrid (dense + BM25) row -> mine with it -> train a cross-encoder started from it
(Ray Train) -> rerank the hybrid run (Ray Data actors) -> fuse -> metrics.json, TREC runs, report.md
with both training curves."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distributed_ir.config import PipelineConfig
from distributed_ir.config_loader import load_config
from distributed_ir.data import beir
from distributed_ir.data.beir import load_beir
from distributed_ir.data.records import read_records
from distributed_ir.eval import rerank
from distributed_ir.eval.metrics import read_run
from distributed_ir.index.bm25 import BM25Index
from distributed_ir.models.rerankers import load_reranker
from distributed_ir.pipeline import run_pipeline
from distributed_ir.pipeline_rerank import FUSED_RUN, RECORDS, RERANKED_RUN
from distributed_ir.report import LOSS_PNG, METRICS_PNG, RERANKER_LOSS_PNG
from tests.conftest import pytrec_means, write_tiny_beir

TOP_K = 10


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_with_reranker_stage(tmp_path, tiny_bert, ray_cluster, monkeypatch):
    folder = write_tiny_beir(tmp_path / "data" / "tiny")
    out = tmp_path / "out"
    cfg = load_config(PipelineConfig, None, [
        f"data_dir={tmp_path / 'data'}", "dataset=tiny", "train_split=train", "eval_split=test",
        f"output_dir={out}", "skip_base_eval=true", f"train.model.name_or_path={tiny_bert}",
        "train.model.query_max_length=16", "train.model.document_max_length=32", "train.scaling.num_workers=1",
        "train.scaling.torch_threads=1", "train.batch_size=2", "train.max_steps=2", "train.log_every=1",
        "eval.batch_size=16", "eval.top_k=20",
        "reranker.enabled=true", "reranker.train.scaling.num_workers=1", "reranker.train.scaling.torch_threads=1",
        "reranker.train.reranker.max_length=48", "reranker.train.reranker.head_lr=1e-3",
        "reranker.train.optim.lr=1e-3", "reranker.train.batch_size=2", "reranker.train.num_negatives=3",
        "reranker.train.max_steps=3", "reranker.train.log_every=1", "reranker.mining.rank_end=12",
        "reranker.mining.per_query=3", f"reranker.top_k={TOP_K}", "reranker.batch_size=8",
        "reranker.precision=fp32", "reranker.actors=2", "reranker.fuse=0.5",
        "hybrid.enabled=true", "hybrid.weight=0.6", "hybrid.shards=2"])
    # the reranker section's own defaults hold where the overrides say nothing
    assert cfg.reranker.train.task == "cross_encoder" and cfg.reranker.train.loss.name == "listwise"
    assert cfg.reranker.train.model.name_or_path == "finetuned" and cfg.reranker.mining.rank_start == 0
    def refuse(*a, **k):
        raise AssertionError("the driver must not hold the corpus texts")

    # In this (driver) process only: the texts (qrels pairs, BM25, rerank pairs) are read by Ray workers.
    for owner, name in ((beir, "load_corpus"), (rerank, "candidate_pairs"), (BM25Index, "from_parts"),
                        (pq, "read_table"), (pq, "ParquetFile")):
        monkeypatch.setattr(owner, name, refuse)
    report = run_pipeline(cfg)
    monkeypatch.undo()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == report["metrics"]
    assert list(saved["metrics"]) == ["bm25", "finetuned", "hybrid", "reranked", "fused"]
    # the bm25 and hybrid rows are trec_eval's numbers on the runs written beside them
    for row, name in (("bm25", "run_bm25.trec"), ("hybrid", "run_hybrid.trec")):
        expected = pytrec_means(read_run(out / name), load_beir(folder, "test").qrels)
        assert saved["metrics"][row]["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-12)

    # mining: the fine-tuned model's ranks over the 8 train queries, judged documents dropped
    train_ds = load_beir(folder, "train")
    mining = saved["reranker_mining"]
    assert mining["queries"] == mining["records"] == 8 and mining["negatives"] == 8 * 3
    assert mining["dropped_positives"] > 0  # ranks from 0: the fine-tuned model finds positives
    fmt, records = read_records(out / RECORDS)
    assert fmt == "triplet" and len(records) == 8
    positives = {train_ds.queries[q]: {train_ds.corpus[d] for d in rels} for q, rels in train_ds.qrels.items()}
    for rec in records:
        assert len(rec.negative) == 3 and not set(rec.negative) & positives[rec.query]

    # the reranker: trained from the fine-tuned embedder, loads and scores
    train = saved["reranker_train"]
    assert train["task"] == "cross_encoder" and train["step"] == 3 and train["records"] == 8
    assert train["init_from"] == str(out / "train" / "model")
    reranker = load_reranker(out / "reranker" / "model")
    assert reranker.kind == "cross_encoder" and reranker.settings.max_length == 48
    assert np.all(np.isfinite(reranker.score("what about cats", ["cats purr fact 0", "rockets fly fact 1"])))

    # rerank + fuse: the fine-tuned run's top_k of every eval query
    rows = saved["metrics"]
    n = rows["finetuned"]["num_queries"]
    assert n == 4 and rows["reranked"]["num_queries"] == rows["fused"]["num_queries"] == n
    assert saved["rerank"]["pairs"] == n * TOP_K and saved["rerank"]["fusion_weight"] == 0.5
    # the reranker's candidates are the hybrid run's top_k (hybrid.rerank defaults to true)
    reranked, fused, first = (read_run(out / name) for name in (RERANKED_RUN, FUSED_RUN, "run_hybrid.trec"))
    assert len(reranked) == n and all(len(docs) == TOP_K for docs in reranked.values())
    for qid, docs in reranked.items():
        assert set(docs) == set(fused[qid]) == set(sorted(first[qid], key=first[qid].get)[-TOP_K:])

    text = (out / "report.md").read_text()
    assert "## Reranker" in text and "| fused |" in text and "| reranked |" in text
    assert "reranked vs finetuned" in text and "fused vs finetuned" in text and "3 logged steps, step 1 to 3" in text
    assert all((out / png).is_file() for png in (LOSS_PNG, METRICS_PNG, RERANKER_LOSS_PNG))
