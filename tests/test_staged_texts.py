"""Texts read from the staged corpus on Ray (issue #13: no process holds the corpus texts): id lookups,
mining, reranking and BM25 over an index folder's ``stage/`` give what the corpus-in-the-driver
path gave, on a tiny BEIR folder and a real local Ray cluster."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from distributed_ir.data.beir import load_beir
from distributed_ir.index.bm25 import BM25Index, BM25Settings, search_staged, top_k
from distributed_ir.index.pipeline import IndexOptions, stage_index_corpus
from distributed_ir.index.texts import MissingDocuments, StagedCorpus
from tests.conftest import write_tiny_beir

DUPLICATE = "doc47"  # its text is doc5's: the duplicate-text rule and tied BM25 scores have work to do


@pytest.fixture(scope="module")
def staged(ray_cluster, tmp_path_factory):
    """A tiny BEIR folder (one document duplicated under another id) and an index folder holding
    only its staged corpus (3 shards)."""
    root = tmp_path_factory.mktemp("staged")
    folder = write_tiny_beir(root / "tiny")
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    copy = dict(json.loads(lines[5]), _id=DUPLICATE)
    (folder / "corpus.jsonl").write_text("\n".join(lines[:47] + [json.dumps(copy)]) + "\n")
    staged, _, _ = stage_index_corpus(IndexOptions(corpus=str(folder / "corpus.jsonl"), out=str(root / "index"),
                                                   num_shards=3))
    assert [s.count for s in staged] == [16, 18, 14]  # shard blake2b(id) % 3
    return folder, root / "index"


def _shard_ids(index) -> list[list[str]]:
    return [pq.read_table(p, columns=["doc_id"])["doc_id"].to_pylist()
            for p in sorted((index / "stage").glob("shard-*.parquet"))]


@pytest.mark.ray
def test_lookup_returns_exactly_the_requested_ids_and_names_missing_ones(staged):
    folder, index = staged
    corpus = load_beir(folder, "test").corpus
    source = StagedCorpus(index)
    wanted = ["doc3", "doc40", "doc5", DUPLICATE, "doc3"]  # ids from every shard, one asked twice
    assert source.texts(wanted) == {d: corpus[d] for d in wanted}
    digests = source.digests(wanted)
    assert digests == {d: hashlib.blake2b(corpus[d].encode(), digest_size=16).digest() for d in wanted}
    assert digests["doc5"] == digests[DUPLICATE] and len(set(digests.values())) == 3
    found = source.find(wanted)
    assert found.lengths == {d: len(corpus[d]) for d in wanted} and len(found.refs) == 3
    assert source.texts([]) == {}
    with pytest.raises(MissingDocuments, match=r"2 of 3 requested documents are not in the staged corpus .*"
                                               r"'nope', 'zzz'") as err:
        source.texts(["doc1", "zzz", "nope"])
    assert err.value.missing == ["nope", "zzz"]


@pytest.mark.ray
def test_mining_and_qrels_pairs_from_the_staged_corpus_equal_the_in_memory_path(staged):
    from distributed_ir.mining import mine_negatives, pairs_from_qrels

    folder, index = staged
    ds = load_beir(folder, "train")
    lean = load_beir(folder, "train", corpus=False)
    assert lean.corpus is None and lean.qrels == ds.qrels and lean.queries == ds.queries
    # every query's window holds its positives, their duplicate and the rest in a fixed shuffle
    order = [f"doc{i}" for i in np.random.default_rng(3).permutation(48)]
    ranked = {q: [*rels, DUPLICATE, *order] for q, rels in ds.qrels.items()}
    expected = mine_negatives(ds, ranked, 0, 20, per_query=4, seed=5)
    assert expected[1]["dropped_duplicate_text"] >= 1  # doc5 is q5's positive: DUPLICATE is dropped
    assert mine_negatives(lean, ranked, 0, 20, per_query=4, seed=5, corpus=StagedCorpus(index)) == expected
    assert pairs_from_qrels(lean, StagedCorpus(index)) == pairs_from_qrels(ds)
    with pytest.raises(ValueError, match="without its corpus texts"):
        pairs_from_qrels(lean)


@pytest.mark.ray
def test_bm25_in_ray_tasks_equals_bm25_index_over_the_same_shards(staged):
    folder, index = staged
    ds = load_beir(folder, "test")
    queries = {**ds.queries, "stop": "the of and"}  # a query of stop words only scores 0 everywhere
    settings = BM25Settings(k1=1.2, b=0.75)
    shards = _shard_ids(index)
    # one index shard: BM25 over the whole corpus, whatever order the staged rows are in
    one = search_staged(index, queries, 20, settings, shards=1)
    assert one == BM25Index.build(ds.corpus, settings).search(queries, 20)
    assert set(one["stop"].values()) == {0.0} and list(one["stop"]) == sorted(ds.corpus, reverse=True)[:20]
    # three: one per staged shard (shards of 16, 18 and 14 documents: not three equal parts)
    timings = []
    assert search_staged(index, queries, 7, settings, shards=3, timings=timings) == \
        BM25Index.from_parts([(ids, [ds.corpus[d] for d in ids]) for ids in shards], settings).search(queries, 7)
    assert len(timings) == 3 and all(t["index_seconds"] > 0 for t in timings)
    # two: staged shards 0 and 2 in one index shard, 1 in the other
    parts = [(ids, [ds.corpus[d] for d in ids]) for ids in (shards[0] + shards[2], shards[1])]
    two = search_staged(index, queries, 7, settings, shards=2)
    assert two == BM25Index.from_parts(parts, settings).search(queries, 7)
    assert two != search_staged(index, queries, 7, settings, shards=1)  # per-shard statistics, as before


def test_bm25_cut_keeps_the_ranking_rules_ties():
    """Tied scores at rank k: the documents evaluation ranks there (doc id descending), whatever the
    order of the documents inside the shard."""
    corpus = {f"d{i}": "cats purr" if i % 3 == 0 else f"rivers flow {i}" for i in range(12)}
    index = BM25Index.build(dict(reversed(corpus.items())))
    run = index.search({"q": "cats"}, 3)["q"]
    assert list(run) == ["d9", "d6", "d3"] and len(set(run.values())) == 1
    scores = np.array([5.0, 1.0, 5.0, 3.0, 3.0, 3.0])
    id_order = np.array([0, 5, 1, 4, 2, 3])
    assert sorted(top_k(scores, id_order, 4)) == [0, 2, 3, 5]  # of the 3.0s, the ids that sort last
    assert len(top_k(scores, id_order, 10)) == 6


@pytest.mark.ray
def test_rerank_with_texts_attached_on_ray_equals_the_text_pairs_path(staged, tiny_bert, tmp_path, monkeypatch):
    from distributed_ir.eval.rerank import candidate_pairs, rerank_run, staged_candidate_pairs
    from distributed_ir.models.cross_encoder import CrossEncoderReranker

    folder, index = staged
    ds = load_beir(folder, "test")
    model = str(CrossEncoderReranker.from_pretrained(str(tiny_bert), max_length=48).save(tmp_path / "ce"))
    queries = ds.split_queries()
    rng = np.random.default_rng(0)
    run = {q: {f"doc{i}": float(s) for i, s in zip(rng.permutation(48)[:30], rng.integers(0, 9, 30))}
           for q in queries}
    pairs = candidate_pairs(run, queries, ds.corpus, 12)
    lean, found = staged_candidate_pairs(run, queries, StagedCorpus(index), 12)
    assert lean == {k: pairs[k] for k in ("query_id", "doc_id", "query")}
    assert found.lengths == {d: len(ds.corpus[d]) for d in pairs["doc_id"]}
    expected = rerank_run(model, run, queries, ds.corpus, 12, batch_size=5, precision="fp32", actors=1)

    def refuse(*a, **k):
        raise AssertionError("the driver must not read the staged corpus")

    monkeypatch.setattr(pq, "ParquetFile", refuse)  # this process only: Ray workers read the shards
    monkeypatch.setattr(pq, "read_table", refuse)
    reranked, first_stage, facts = rerank_run(model, run, queries, StagedCorpus(index), 12, batch_size=5,
                                              precision="fp32", actors=1)
    assert (reranked, first_stage) == expected[:2] and facts["pairs"] == expected[2]["pairs"] == 4 * 12
    with pytest.raises(MissingDocuments, match="'ghost'"):
        rerank_run(model, {"q8": {"ghost": 1.0}}, queries, StagedCorpus(index), 12, actors=1)
