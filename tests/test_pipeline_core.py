"""The pipeline on the retrieval core: its encode, search and mining stages run on Ray actors (the
driver builds no model and reads no vector) and give what the old in-process path gave (driver
encode into a FAISS IndexFlatIP, ``metrics.rank`` over its hits), row for row and record for record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_ir.config import ModelConfig, PipelineConfig
from distributed_ir.config_loader import load_config
from distributed_ir.data.beir import BeirDataset, load_beir
from distributed_ir.data.records import read_records
from distributed_ir.eval.metrics import DEFAULT_METRICS, evaluate, rank, read_run
from distributed_ir.mining import mine_negatives
from distributed_ir.models.embedder import Embedder
from tests.conftest import refuse_corpus_reads, write_tiny_beir


def old_in_process_run(embedder: Embedder, ds: BeirDataset, queries: dict[str, str], top_k: int,
                       batch_size: int = 16) -> dict[str, dict[str, float]]:
    """The pipeline's former path (eval/retrieval.py, mining.mine_in_process), kept here as the
    oracle: encode the corpus and the queries in this process, exact inner-product FAISS search."""
    import faiss

    doc_ids = list(ds.corpus)
    index = faiss.IndexFlatIP(embedder.dim)
    index.add(embedder.encode([ds.corpus[d] for d in doc_ids], "document", batch_size))
    qids = list(queries)
    scores, idx = index.search(embedder.encode([queries[q] for q in qids], "query", batch_size),
                               min(top_k, len(doc_ids)))
    return {q: {doc_ids[j]: float(s) for s, j in zip(scores[r], idx[r]) if j >= 0} for r, q in enumerate(qids)}


def _assert_same_run(new: dict[str, dict[str, float]], old: dict[str, dict[str, float]]) -> None:
    assert list(new) == list(old)
    for q in old:
        assert rank(new[q]) == rank(old[q]), q
        np.testing.assert_allclose([new[q][d] for d in rank(old[q])], [old[q][d] for d in rank(old[q])], atol=1e-5)


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_encodes_searches_and_mines_on_ray_actors_as_the_in_process_path_did(tmp_path, tiny_bert,
                                                                                      ray_cluster, monkeypatch):
    from distributed_ir.data import beir
    from distributed_ir.index import parts, shards
    from distributed_ir.pipeline import run_pipeline

    folder = write_tiny_beir(tmp_path / "data" / "tiny")
    out = tmp_path / "out"
    top_k, rank_start, rank_end, per_query, seed = 20, 1, 12, 2, 7
    cfg = load_config(PipelineConfig, None, [
        f"data_dir={tmp_path / 'data'}", "dataset=tiny", "train_split=train", "eval_split=test",
        f"output_dir={out}", f"train.model.name_or_path={tiny_bert}", "train.model.query_max_length=16",
        "train.model.document_max_length=32", "train.scaling.num_workers=1", "train.scaling.torch_threads=1",
        "train.batch_size=2", "train.max_steps=2", "train.log_every=1", "train.optim.lr=1e-3",
        f"train.seed={seed}", "train.num_negatives=1", "eval.batch_size=16", f"eval.top_k={top_k}",
        "eval.num_shards=3", "eval.index_shards=2", "mining.enabled=true", f"mining.rank_start={rank_start}",
        f"mining.rank_end={rank_end}", f"mining.per_query={per_query}"])

    def refuse(*a, **k):
        raise AssertionError("the driver must not build a model, read vectors or load the corpus texts")

    # In this (driver) process only: Ray actors, tasks and Ray Train workers import the real ones.
    monkeypatch.setattr(Embedder, "__init__", refuse)
    for mod, name in ((shards, "iter_shard"), (shards, "read_shard"), (parts, "iter_shard")):
        monkeypatch.setattr(mod, name, refuse)
    refuse_corpus_reads(monkeypatch)  # no corpus row either: qrels doc ids are checked on the staged shards
    with pytest.raises(AssertionError, match="must not build"):  # the guards do guard
        Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert)))
    with pytest.raises(AssertionError, match="must not read the corpus"):
        beir.load_beir(folder, "test")
    report = run_pipeline(cfg)
    monkeypatch.undo()

    # metrics.json, the runs and the report keep their format
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == report["metrics"] and list(saved["metrics"]) == ["base", "finetuned"]
    assert set(saved["metrics"]["base"]) >= set(DEFAULT_METRICS) | {"num_queries", "encode_docs_per_s"}
    assert (out / "report.md").is_file()
    # the corpus was encoded by the index path: worker-written shards, each document once
    for name in ("index_base", "index_finetuned"):
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["num_docs"] == 48 and len(manifest["shards"]) == 3, name
        assert sum(e["count"] for e in manifest["shards"].values()) == 48
        # eval.index_shards: two FAISS parts, each searched by its own searcher actor, same hits as one
        assert len(json.loads((out / name / "index" / "index.json").read_text())["parts"]) == 2, name
    assert json.loads((out / "index_finetuned" / "manifest.json").read_text())["model"] == str(out / "train" / "model")
    # the fine-tuned index took over the base index's staged corpus (not read and validated again)
    staged = sorted((out / "index_base" / "stage").glob("shard-*.parquet"))
    assert len(staged) == 3 and all((out / "index_finetuned" / "stage" / p.name).stat().st_mtime_ns
                                    == p.stat().st_mtime_ns for p in staged)

    # the old in-process path, in this process, on the same models and settings
    train_ds, test_ds = load_beir(folder, "train"), load_beir(folder, "test")
    base = Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert), query_max_length=16,
                                            document_max_length=32))
    old_base = old_in_process_run(base, test_ds, test_ds.split_queries(), top_k)
    _assert_same_run(read_run(out / "run_base.trec"), old_base)
    old_row = evaluate(old_base, test_ds.qrels, DEFAULT_METRICS)
    for metric in (*DEFAULT_METRICS, "num_queries"):
        assert saved["metrics"]["base"][metric] == pytest.approx(old_row[metric], abs=1e-6), metric

    old_mined = old_in_process_run(base, train_ds, train_ds.split_queries(), rank_end)
    old_records, old_counts, _ = mine_negatives(train_ds, {q: rank(s) for q, s in old_mined.items()}, rank_start,
                                                rank_end, per_query, seed)
    fmt, records = read_records(out / "train_records.jsonl")
    assert fmt == "triplet" and records == old_records and old_counts["negatives"] > 0
    assert {k: saved["mining"][k] for k in old_counts} == old_counts
    assert saved["train"]["records"] == len(old_records) == 8

    tuned = Embedder.load(out / "train" / "model")
    old_tuned = old_in_process_run(tuned, test_ds, test_ds.split_queries(), top_k)
    _assert_same_run(read_run(out / "run.trec"), old_tuned)
    old_row = evaluate(old_tuned, test_ds.qrels, DEFAULT_METRICS)
    for metric in DEFAULT_METRICS:
        assert saved["metrics"]["finetuned"][metric] == pytest.approx(old_row[metric], abs=1e-6), metric
