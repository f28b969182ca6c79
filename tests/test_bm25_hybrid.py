"""BM25 through bm25s (scores equal bm25s's own, shards merged by the ranking rule, save/load) and
hybrid fusion of a dense and a sparse run (convex on min-max scores, RRF), on constant scores too."""

from __future__ import annotations

import bm25s
import pytest
import Stemmer

from distributed_ir.eval.fusion import hybrid_runs
from distributed_ir.eval.metrics import rank
from distributed_ir.index.bm25 import BM25Index, BM25Settings

CORPUS = {f"d{i}": text for i, text in enumerate([
    "cats purr and sleep all day", "rockets reach orbit with fuel", "bread needs yeast and flour",
    "sleeping cats dream of mice", "rivers flow to the sea", "chess openings matter for cats",
    "the orbit of the moon", "yeast makes bread rise", "bees make honey", "trains run on rails"])}
QUERIES = {"q1": "why do cats sleep", "q2": "bread yeast", "q3": "moon orbit rockets"}


def _bm25s_run(settings: BM25Settings, k: int) -> dict[str, dict[str, float]]:
    """bm25s itself on the same corpus and settings (one index)."""
    stem = Stemmer.Stemmer(settings.stemmer)
    ids = list(CORPUS)
    model = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
    model.index(bm25s.tokenize([CORPUS[d] for d in ids], stopwords="en", stemmer=stem, show_progress=False),
                show_progress=False)
    qids = list(QUERIES)
    docs, scores = model.retrieve(bm25s.tokenize([QUERIES[q] for q in qids], stopwords="en", stemmer=stem,
                                                 show_progress=False), k=k, show_progress=False)
    return {q: {ids[int(d)]: float(s) for d, s in zip(docs[n], scores[n])} for n, q in enumerate(qids)}


def test_bm25_scores_equal_bm25s_and_survive_save_load(tmp_path):
    settings = BM25Settings(k1=1.2, b=0.75)
    index = BM25Index.build(CORPUS, settings)
    run = index.search(QUERIES, k=4)
    expected = _bm25s_run(settings, 4)
    assert run.keys() == expected.keys()
    for q in run:
        assert run[q] == pytest.approx(expected[q], abs=1e-6)
    assert rank(run["q2"])[:2] == ["d7", "d2"] or rank(run["q2"])[:2] == ["d2", "d7"]  # the two yeast/bread docs
    again = BM25Index.load(index.save(tmp_path / "bm25"))
    assert again.search(QUERIES, k=4) == run


def test_shards_merge_each_shards_top_k_by_the_ranking_rule():
    index = BM25Index.build(CORPUS, shards=3)
    assert [len(ids) for ids in index.doc_ids] == [4, 3, 3]
    run = index.search(QUERIES, k=3)
    for q, hits in run.items():
        per_shard = {}
        for model, ids in zip(index.shards, index.doc_ids):
            docs, scores = model.retrieve(index._tokenize([QUERIES[q]]), k=3, show_progress=False)
            per_shard.update((ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0]))
        assert list(hits) == rank(per_shard)[:3]


def test_hybrid_convex_and_rrf_by_hand():
    dense = {"q": {"a": 0.9, "b": 0.5, "c": 0.1}}
    sparse = {"q": {"b": 12.0, "d": 4.0}}
    got = hybrid_runs(dense, sparse, weight=0.25)["q"]
    # min-max per run: dense a 1, b .5, c 0; sparse b 1, d 0; a missing document scores 0
    assert got == pytest.approx({"a": 0.25, "b": 0.25 * 0.5 + 0.75, "c": 0.0, "d": 0.0})
    rrf = hybrid_runs(dense, sparse, weight=0.5, method="rrf", rrf_k=60)["q"]
    assert rrf == pytest.approx({"a": 0.5 / 61, "b": 0.5 / 62 + 0.5 / 61, "c": 0.5 / 63, "d": 0.5 / 62})
    assert hybrid_runs(dense, sparse, 1.0)["q"]["a"] == 1.0 and hybrid_runs(dense, sparse, 0.0)["q"]["b"] == 1.0


def test_hybrid_on_constant_scores_lets_the_other_run_decide():
    dense = {"q": {"a": 0.7, "b": 0.7, "c": 0.7}}  # a constant list: min-max gives 0 everywhere, no 0/0
    sparse = {"q": {"c": 3.0, "a": 1.0}}
    got = hybrid_runs(dense, sparse, weight=0.5)["q"]
    assert rank(got) == ["c", "b", "a"] and got["c"] == pytest.approx(0.5) and got["a"] == 0.0
    with pytest.raises(ValueError, match="weight"):
        hybrid_runs(dense, sparse, 1.5)
