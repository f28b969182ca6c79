"""Indexing: EncodeStage, corpus staging, FAISS build/search/merge, and the Ray Data pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_ir.config import ModelConfig
from distributed_ir.data.errors import DataError
from distributed_ir.index.corpus import expand_corpus, stage_corpus
from distributed_ir.index.encode import EncodeStage
from distributed_ir.index.faiss_index import ShardedIndex, build_index, merge_topk
from distributed_ir.index.parts import load_sharded
from distributed_ir.models.embedder import Embedder
from tests.conftest import last_json, run_cli


def _corpus(path, n, start=0):
    with path.open("w") as fh:
        for i in range(start, start + n):
            fh.write(json.dumps({"_id": f"doc{i}", "title": f"title {i}", "text": f"body {i} " + "word " * (i % 17)}) + "\n")
    return path


def test_encode_stage_equals_embedder(tiny_bert):
    texts = np.array(["a b c", "a much longer text " * 5, "x"], dtype=object)
    stage = EncodeStage(str(tiny_bert), batch_size=2, precision="fp32", device="cpu")
    out = stage({"doc_id": np.array(["1", "2", "3"]), "text": texts, "shard": np.array([0, 0, 1])})
    assert set(out) == {"doc_id", "shard", "embedding"} and out["shard"].tolist() == [0, 0, 1]
    ref = Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert))).encode(list(texts))
    np.testing.assert_allclose(out["embedding"], ref, atol=1e-5)


@pytest.mark.ray
def test_staging_shards_and_rejects_duplicates_naming_both_lines(tmp_path, ray_cluster):
    a = _corpus(tmp_path / "a.jsonl", 10)
    b = _corpus(tmp_path / "b.jsonl", 5, start=10)
    shards, stage_id = stage_corpus(expand_corpus(str(tmp_path / "*.jsonl")), tmp_path / "stage", 3)
    assert [s.count for s in shards] == [8, 3, 4]  # shard blake2b(id) % 3
    assert stage_corpus([a, b], tmp_path / "stage", 3)[1] == stage_id  # reused
    few, _ = stage_corpus([b], tmp_path / "stage3", 8)  # more shards than documents: no empty shards
    assert [(s.index, s.count) for s in few] == [(0, 1), (1, 1), (4, 1), (5, 1), (6, 1)]
    with (tmp_path / "b.jsonl").open("a") as fh:
        fh.write(json.dumps({"_id": "doc3", "text": "again"}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:6: field '_id': duplicate id 'doc3', first at .*a\.jsonl:4"):
        stage_corpus([a, b], tmp_path / "stage2", 3)
    with pytest.raises(DataError, match="no corpus files"):
        expand_corpus(str(tmp_path / "*.tsv"))


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_topk_equals_brute_force_and_ids_survive():
    docs, queries = _unit(500, 16, 0), _unit(20, 16, 1)
    ids = np.arange(1000, 1500, dtype=np.int64)
    index = build_index(docs, ids, "Flat")
    scores, got = index.search(queries, 10)
    brute = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    np.testing.assert_array_equal(got, ids[brute])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ docs.T, brute, 1), atol=1e-5)


@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW16", "IVF8,PQ4"])
def test_approximate_indexes_keep_ids(factory):
    docs = _unit(2000, 16, 2)
    ids = np.arange(2000, dtype=np.int64) * 7
    index = build_index(docs, ids, factory, nprobe=8)
    _, got = index.search(docs[:50], 5)
    assert set(got.ravel()) <= set(ids.tolist())
    recall = np.mean([ids[i] in got[i] for i in range(50)])
    assert recall >= (0.5 if "PQ" in factory else 0.9)


def test_sharded_search_merges_to_single_index_topk(tmp_path):
    docs, queries = _unit(900, 16, 3), _unit(30, 16, 4)
    pos = np.arange(900, dtype=np.int64)
    single = ShardedIndex([build_index(docs, pos, "Flat")], [f"d{i}" for i in range(900)])
    parts = np.array_split(pos, 3)
    sharded = ShardedIndex([build_index(docs[p], p, "Flat") for p in parts], single.doc_ids)
    sharded.save(tmp_path / "ix")
    loaded = load_sharded(tmp_path / "ix")
    assert loaded.ntotal == 900 and len(loaded.indexes) == 3
    s1, i1 = single.search(queries, 10, batch_size=7)
    s2, i2 = loaded.search(queries, 10, batch_size=7)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)


def test_merge_topk_puts_missing_last():
    a = (np.array([[0.9, 0.1]], np.float32), np.array([[1, 2]]))
    b = (np.array([[0.5, 0.0]], np.float32), np.array([[3, -1]]))
    scores, ids = merge_topk([a, b], 3)
    assert ids.tolist() == [[1, 3, 2]]


@pytest.mark.slow
@pytest.mark.ray
def test_index_pipeline_exact_resumable_and_searchable(tiny_bert, tmp_path):
    _corpus(tmp_path / "c1.jsonl", 60)
    _corpus(tmp_path / "c2.jsonl", 40, start=60)
    out = tmp_path / "idx"
    args = ["index", "--model", str(tiny_bert), "--corpus", str(tmp_path / "c*.jsonl"), "--out", str(out),
            "--num-shards", "4", "--batch-size", "8", "--precision", "fp32"]
    # 1. a job killed after 2 of 4 shards (real process death mid-pipeline)
    died = run_cli(*args, env={"DIR_FAIL_AFTER_SHARDS": "2"})
    assert died.returncode == 17, died.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2
    first = {k: (out / v["file"]).stat().st_mtime_ns for k, v in manifest["shards"].items()}
    # 2. rerun resumes: the finished shards are not re-encoded
    ok = run_cli(*args)
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = last_json(ok.stdout)
    assert summary["skipped_shards"] == 2 and summary["indexed"] == summary["docs"] == 100
    manifest = json.loads((out / "manifest.json").read_text())
    assert {k: (out / manifest["shards"][k]["file"]).stat().st_mtime_ns for k in first} == first
    assert summary["encoded_docs"] == 100 - sum(manifest["shards"][k]["count"] for k in first)
    # the actors' precision decision reached the manifest (Ray Data carried it back)
    assert manifest["precision"]["requested"] == "fp32" and manifest["precision"]["chosen"] == ["fp32"]
    # every id exactly once, embeddings equal to the in-process encode
    from distributed_ir.index.pipeline import read_shard

    ids, vecs = [], []
    for entry in manifest["shards"].values():
        i, v = read_shard(out, entry)
        ids += i
        vecs.append(v)
    assert sorted(ids) == sorted(f"doc{i}" for i in range(100))
    emb = Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert)))
    texts = {f"doc{i}": f"title {i} body {i} " + "word " * (i % 17) for i in range(100)}
    ref = emb.encode([texts[d].strip() for d in ids])
    cos = np.sum(np.concatenate(vecs) * ref, axis=1)
    assert cos.min() >= 0.9999
    # 3. a corrupted shard is detected and re-encoded, never indexed
    victim = out / manifest["shards"]["1"]["file"]
    victim.write_bytes(victim.read_bytes()[:100])
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = last_json(again.stdout)
    assert summary["skipped_shards"] == 3 and summary["encoded_docs"] == manifest["shards"]["1"]["count"]
    # 4. search writes a run whose top hit for a document's own text is that document
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": texts[f"doc{i}"]}) + "\n"
                                              for i in (3, 50, 99)))
    res = run_cli("search", "--index", str(out), "--queries", str(tmp_path / "q.jsonl"), "--out",
                  str(tmp_path / "run.trec"), "--top-k", "5", "--precision", "fp32")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert len(lines) == 15
    top = {ln.split()[0]: ln.split()[2] for ln in lines if ln.split()[3] == "1"}
    assert top == {"q3": "doc3", "q50": "doc50", "q99": "doc99"}
