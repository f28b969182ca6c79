"""Per-part searcher actors: a query batch searched by one actor per index part and merged by the
ranking rule returns exactly what one process holding every part returns (ids, scores, ties);
each searcher holds its own part only; the `search` command and the index build run on them."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from distributed_ir.eval.metrics import rank, read_run
from distributed_ir.index.actors import ActorStartTimeout
from distributed_ir.index.parts import (
    PartSearcher,
    build_parts,
    hit_dicts,
    merge_hits,
    part_groups,
    search_hits,
    search_parts,
)
from distributed_ir.index.shards import write_shard
from distributed_ir.index.staging import id_hash
from distributed_ir.index.storage import Location
from tests.conftest import last_json

TOPICS = ["cats purr softly", "rockets reach orbit", "bread rises with yeast", "glaciers carve valleys",
          "violins have strings", "owls hunt at night", "copper conducts"]


def _tied_parts(tmp_path, parts=3):
    """Six documents per vector value, spread over every part (tied scores in every part)."""
    base = np.random.default_rng(0).standard_normal((7, 8)).astype(np.float32)
    order = np.random.default_rng(1).permutation(42)
    vecs = base[order % 7]
    ids = [f"d{i:02d}" for i in order]
    loc = Location(tmp_path / "idx")
    entries = [write_shard(loc, i, ids[i * 14:(i + 1) * 14], vecs[i * 14:(i + 1) * 14]) for i in range(3)]
    meta = build_parts(loc, entries, "Flat", 8, num_parts=parts, remote=False)
    return loc.child("index"), meta, base


def test_part_groups():
    assert part_groups(3) == [[0], [1], [2]] and part_groups(3, 7) == [[0], [1], [2]]
    assert part_groups(5, 2) == [[0, 1, 2], [3, 4]] and part_groups(4, 1) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError, match="searchers must be >= 0"):
        part_groups(3, -1)


def test_a_tie_inside_one_part_is_cut_by_the_ranking_rule(tmp_path):
    """Six identical vectors in one part, top 4: the four highest doc ids (FAISS alone would keep the
    four first positions)."""
    folder, _, base = _tied_parts(tmp_path, parts=1)
    everything = search_parts(folder, base, 42)
    for q, hits in enumerate(search_parts(folder, base, 4)):
        best = max(everything[q].values())
        tied = sorted((d for d, s in everything[q].items() if s == best), reverse=True)
        assert rank(hits) == tied[:4] and set(hits.values()) == {best}


def test_searchers_of_one_part_each_merge_to_the_single_process_hits(tmp_path):
    """Three searchers, one part each, merged: the same hits (ids and float scores) as one pass over
    every part, ties across the top-k cut kept by the ranking rule (the highest doc ids)."""
    folder, meta, base = _tied_parts(tmp_path)
    queries = np.concatenate([base, np.random.default_rng(2).standard_normal((20, 8)).astype(np.float32)])
    searchers = [PartSearcher(folder, [j]) for j in range(3)]
    assert [s.ntotal for s in searchers] == [p["ntotal"] for p in meta["parts"]] == [14, 14, 14]
    assert [len(list(s.doc_ids())) for s in searchers] == [14, 14, 14]
    for k in (4, 9, 42):
        merged = hit_dicts(merge_hits([s.search(queries, k) for s in searchers], k))
        single = search_parts(folder, queries, k)
        assert merged == single  # exact floats
        assert [rank(h) for h in merged] == [rank(h) for h in single]
    # the tie rule at the cut: query 0 ties six documents (one vector), the top 4 are the highest ids
    everything = search_parts(folder, base[:1], 42)[0]
    tied = sorted((d for d, s in everything.items() if s == max(everything.values())), reverse=True)
    assert len(tied) == 6 and rank(search_parts(folder, base[:1], 4)[0]) == tied[:4]
    assert {p for p in range(3) for d in tied if d in set(searchers[p].doc_ids())} == {0, 1, 2}
    # one searcher holding every part is the streaming searcher
    whole = PartSearcher(folder)
    assert whole.which == [0, 1, 2] and hit_dicts(whole.search(queries, 9)) == search_parts(folder, queries, 9)
    assert hit_dicts(search_hits(whole.parts, queries, 9)) == search_parts(folder, queries, 9)


# ------------------------------------------------------------------ on a local Ray cluster
def _tied_corpus(path, shards=3, texts=5):
    """Five texts written six times each, two documents in each of the three staged shards (staging
    puts a document in shard ``id_hash(id) % shards``: the ids are picked for that)."""
    need = {(t, s): 2 for t in range(texts) for s in range(shards)}
    rows, i = [], 0
    while need:
        doc_id, i = f"doc{i:03d}", i + 1
        shard = id_hash(doc_id) % shards
        topic = next((t for t in range(texts) if need.get((t, shard))), None)
        if topic is None:
            continue
        need[(topic, shard)] -= 1
        need = {k: v for k, v in need.items() if v}
        rows.append(json.dumps({"_id": doc_id, "text": TOPICS[topic]}) + "\n")
    path.write_text("".join(rows))
    return path


@pytest.fixture(scope="module")
def three_part_index(ray_cluster, tiny_bert, tmp_path_factory):
    """A 3-part index of the tied corpus, and the reference run: every document's score for each
    query from one query actor holding all three parts (today's single-process searcher)."""
    from distributed_ir.index.pipeline import IndexOptions, build_faiss, encode_corpus
    from distributed_ir.index.retrieve import search_queries

    root = tmp_path_factory.mktemp("fanout")
    opts = IndexOptions(model=str(tiny_bert), corpus=str(_tied_corpus(root / "corpus.jsonl")), out=str(root / "idx"),
                        num_shards=3, batch_size=1, precision="fp32", actors=1)  # no padding: equal texts, equal vectors
    meta = build_faiss(root / "idx", encode_corpus(opts, progress=False), "Flat", index_shards=3)
    queries = {f"q{i}": t for i, t in enumerate(TOPICS)}
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    part_of = {d: j for j in range(len(meta["parts"])) for d in PartSearcher(root / "idx" / "index", [j]).doc_ids()}
    # batch_size 1: each query encoded alone here and in the tests (the same vector, bit for bit)
    everything = search_queries(str(root / "idx"), queries, 30, batch_size=1, precision="fp32", actors=1, searchers=1)
    return root, meta, queries, part_of, everything


def _top(run, k):
    """Each query's first ``k`` hits by the ranking rule, with their scores."""
    return {q: {d: hits[d] for d in rank(hits)[:k]} for q, hits in run.items()}


@pytest.mark.ray
def test_search_fans_out_to_one_actor_per_part_and_equals_one_process(three_part_index):
    from distributed_ir.index.retrieve import search_queries

    root, meta, queries, part_of, everything = three_part_index
    assert len(meta["parts"]) == 3
    stats: list[dict] = []
    fanned = search_queries(str(root / "idx"), queries, 4, batch_size=1, precision="fp32", actors=1,
                            searcher_stats=stats)
    assert list(fanned) == list(queries) and fanned == _top(everything, 4)  # ids and float scores
    # each text is six documents over the three parts: every top 4 cuts a six-way tie, by the rule
    for q in queries:
        ranked = rank(everything[q])
        tied = [d for d in ranked if everything[q][d] == everything[q][ranked[0]]]
        assert len(tied) == 6 and len({part_of[d] for d in tied}) == 3, (q, everything[q])
        assert rank(fanned[q]) == sorted(tied, reverse=True)[:4]
    # one searcher actor per part, each holding that part only, each searched every query
    assert sorted(s["parts"] for s in stats) == [[0], [1], [2]]
    assert len({s["pid"] for s in stats}) == 3 and os.getpid() not in {s["pid"] for s in stats}
    assert {tuple(s["parts"]): s["ntotal"] for s in stats} == {(j,): p["ntotal"] for j, p in enumerate(meta["parts"])}
    assert [s["queries"] for s in stats] == [len(queries)] * 3


@pytest.mark.ray
def test_search_command_runs_on_the_searcher_actors(three_part_index, tmp_path, capsys):
    from distributed_ir import cli

    root, _, queries, _, everything = three_part_index
    assert cli.main(["search", "--index", str(root / "idx"), "--queries", str(root / "queries.jsonl"), "--out",
                     str(tmp_path / "run.trec"), "--top-k", "4", "--batch-size", "1", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    summary = last_json(out)
    assert (summary["queries"], summary["top_k"], summary["index_docs"]) == (len(queries), 4, 30)
    assert summary["run"] == str(tmp_path / "run.trec")
    assert read_run(tmp_path / "run.trec") == _top(everything, 4)  # every id and score, written in full precision


@pytest.mark.ray
def test_gpu_requests_wait_for_the_autoscaler_then_name_what_is_missing(three_part_index, tmp_path):
    """Searchers and index build tasks asking for a GPU the cluster does not have: waited for (an
    autoscaler could add it) for the configured time, then an error naming the request."""
    from distributed_ir.index.retrieve import search_queries

    root, _, queries, _, _ = three_part_index
    t0 = time.perf_counter()
    with pytest.raises(ActorStartTimeout, match=r"part searchers: 3 actor\(s\) asking for .*'GPU': 1\.0.* did not "
                                                r"start within 3 s; the cluster still does not have \{'GPU': 1\.0\}"):
        search_queries(str(root / "idx"), queries, 4, precision="fp32", searcher_gpus=1.0, actor_start_timeout_s=3)
    assert 3 <= time.perf_counter() - t0 < 30
    folder, base = Location(tmp_path / "gpu"), np.eye(8, dtype=np.float32)
    entries = [write_shard(folder, 0, [f"d{i}" for i in range(8)], base)]
    t0 = time.perf_counter()
    with pytest.raises(ActorStartTimeout, match=r"index build: 1 task\(s\) asking for .*'GPU': 1.* did not start "
                                                r"within 2 s; the cluster still does not have \{'GPU': 1\}"):
        build_parts(folder, entries, "Flat", 8, use_gpu=True, start_timeout_s=2)
    assert 2 <= time.perf_counter() - t0 < 30
    assert not folder.child("index").is_file("index.json")
