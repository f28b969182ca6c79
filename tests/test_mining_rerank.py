"""Hard-negative mining and distributed reranking on a tiny BEIR folder and a real local Ray cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_ir.data.beir import BeirDataset
from distributed_ir.mining import count_qrels_positives, mine_negatives
from tests.conftest import last_json, refuse_corpus_reads, write_tiny_beir


def test_mined_negatives_skip_judged_docs_and_duplicate_texts():
    corpus = {f"d{i}": f"text {i}" for i in range(30)}
    corpus["d9"] = corpus["d3"]  # the positive's text again under another id
    ds = BeirDataset(corpus=corpus, queries={"q0": "a", "q1": "b", "q2": "c"},
                     qrels={"q0": {"d3": 1, "d5": 0}, "q1": {"d0": 1}, "q2": {"d1": 0}})
    ranked = {"q0": [f"d{i}" for i in range(30)], "q1": [f"d{i}" for i in range(29, -1, -1)]}
    records, counts, chosen = mine_negatives(ds, ranked, rank_start=2, rank_end=12, per_query=20)
    assert counts == {"queries": 2, "negatives": 7 + 10, "dropped_positives": 2, "dropped_duplicate_text": 1,
                      "without_negatives": 0}  # q2 has no relevant doc: not a training query
    assert not {"d3", "d5", "d9"} & set(chosen["q0"]) and "d0" not in chosen["q1"]
    assert all(set(ids) <= set(ranked[q][2:12]) for q, ids in chosen.items())
    assert "text 3" not in records[0].negative


def test_negatives_that_are_qrels_positives_are_counted():
    """The count the mine summary reports is computed from the chosen ids, not written as 0."""
    ds = BeirDataset(corpus={f"d{i}": f"text {i}" for i in range(6)}, queries={"q0": "a", "q1": "b"},
                     qrels={"q0": {"d3": 1, "d5": 0}, "q1": {"d0": 2, "d1": 1}})
    assert count_qrels_positives(ds, {"q0": ["d3", "d5", "d4"], "q1": ["d0", "d1", "d3"]}) == 3  # not d5 (rel 0)
    assert count_qrels_positives(ds, {"q0": ["d0", "d1"], "q1": ["d3", "d5"]}) == 0  # another query's positives
    _, _, chosen = mine_negatives(ds, {"q0": list(ds.corpus), "q1": list(ds.corpus)}, 0, 6, per_query=6)
    assert count_qrels_positives(ds, chosen) == 0 and chosen["q1"]


def test_mining_ranks_ties_as_evaluation_does(tiny_bert, tmp_path):
    """Tied scores: the retrieval core (a run ranked by `ranked_ids`, the search actors' QuerySearchStage)
    orders the hits as evaluation does (trec_eval: score descending, then doc id descending), so a mining window
    ``[rank_start, rank_end)`` holds the documents evaluation ranks there."""
    from distributed_ir.eval.metrics import rank, read_run
    from distributed_ir.index.faiss_index import ShardedIndex, build_index
    from distributed_ir.index.pipeline import MANIFEST
    from distributed_ir.index.retrieve import QuerySearchStage, ranked_ids
    from distributed_ir.index.search import search_index

    # a run whose ties sit in retrieval order (ascending ids), as FAISS returns them
    run = {"q": {"d1": 0.5, "d2": 0.5, "d3": 0.5, "d0": 0.9, "d4": 0.1}}
    assert ranked_ids(run)["q"] == rank(run["q"]) == ["d0", "d3", "d2", "d1", "d4"]
    # `distributed-ir mine`: every document has the same vector, so every score ties; FAISS returns
    # tied hits by position, and positions are not in doc id order
    doc_ids = ["d3", "d0", "d5", "d1", "d4", "d2"]
    vectors = np.tile(np.linspace(0.1, 1.0, 32, dtype=np.float32), (6, 1))
    ShardedIndex([build_index(vectors, np.arange(6), use_gpu=False)], doc_ids).save(tmp_path / "ix" / "index")
    (tmp_path / "ix" / MANIFEST).write_text(json.dumps({"model": str(tiny_bert)}))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "cats purr"}) + "\n")
    search_index(tmp_path / "ix", tmp_path / "queries.jsonl", tmp_path / "run.trec", top_k=6, precision="fp32",
                 progress=False)
    evaluated = read_run(tmp_path / "run.trec")["q"]
    assert len(set(evaluated.values())) == 1  # all tied
    stage = QuerySearchStage(str(tmp_path / "ix"), top_k=6, precision="fp32")
    found = stage({"query_id": np.array(["q"]), "text": np.array(["cats purr"])}).to_pydict()
    assert found["doc_ids"][0] == rank(evaluated) == sorted(doc_ids, reverse=True)
    assert found["scores"][0] == [evaluated[d] for d in found["doc_ids"][0]]  # the scores `search` wrote


@pytest.fixture(scope="module")
def beir_index(ray_cluster, tiny_bert, tmp_path_factory):
    from distributed_ir.index.pipeline import IndexOptions, build_faiss, encode_corpus

    root = tmp_path_factory.mktemp("beir")
    folder = write_tiny_beir(root / "tiny")
    opts = IndexOptions(model=str(tiny_bert), corpus=str(folder / "corpus.jsonl"), out=str(root / "index"),
                        num_shards=2, batch_size=16, precision="fp32", actors=2)
    manifest = encode_corpus(opts, progress=False)
    build_faiss(root / "index", manifest, "Flat")
    return folder, root / "index"


@pytest.mark.ray
def test_mine_command_distributed_over_queries(beir_index, tmp_path, capsys):
    """`distributed-ir mine --config FILE` with a dotted override and a flag over the file."""
    from distributed_ir import cli
    from distributed_ir.data.beir import load_beir
    from distributed_ir.data.records import read_records

    folder, index = beir_index
    config = {"index": str(index), "dataset": str(folder), "out": str(tmp_path / "mined.jsonl"), "rank_start": 2,
              "rank_end": 50, "per_query": 8, "precision": "auto", "actors": 2}
    (tmp_path / "mine.yaml").write_text(json.dumps(config))
    assert cli.main(["mine", "--config", str(tmp_path / "mine.yaml"), "rank_end=20", "--per-query", "4"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert (summary["rank_start"], summary["rank_end"], summary["per_query"], summary["split"]) == (2, 20, 4, "train")
    # auto measured (or found cached) in the actors; their decision reaches the summary
    assert summary["precision_requested"] == "auto" and summary["precision"] in ("fp32", "bf16", "bf16w", "int8", "openvino")
    assert summary["precision_speedup_vs_fp32"] >= 1.05 or summary["precision"] == "fp32"
    assert summary["queries"] == summary["records"] == 8
    assert summary["negatives"] == 8 * 4
    assert summary["dropped_positives"] > 0  # the tiny encoder does rank some positives in 2..20
    assert json.loads((tmp_path / "mined.jsonl.counts.json").read_text()) == summary
    # the written records, checked against the qrels without the miner's own counts
    ds = load_beir(folder, "train")
    fmt, records = read_records(tmp_path / "mined.jsonl")
    assert fmt == "triplet" and len(records) == 8
    qid_of = {ds.queries[q]: q for q in ds.qrels}
    ids_of: dict[str, set[str]] = {}
    for doc_id, text in ds.corpus.items():
        ids_of.setdefault(text, set()).add(doc_id)
    negatives_that_are_positives = 0
    for rec in records:
        rels = ds.qrels[qid_of[rec.query]]
        assert sorted(rec.positive) == sorted(ds.corpus[d] for d, r in rels.items() if r > 0)
        negative_ids = set().union(*(ids_of[t] for t in rec.negative))
        assert len(rec.negative) == 4 and not negative_ids & set(rels)  # never a judged document
        negatives_that_are_positives += sum(1 for d in negative_ids if rels.get(d, 0) > 0)
    assert summary["negatives_that_are_qrels_positives"] == negatives_that_are_positives


@pytest.fixture(scope="module")
def three_part_index(beir_index, tiny_bert, tmp_path_factory):
    """The tiny BEIR corpus in an index of three FAISS parts (searched by up to three searcher actors)."""
    from distributed_ir.index.pipeline import IndexOptions, build_faiss, encode_corpus

    folder, _ = beir_index
    out = tmp_path_factory.mktemp("parts") / "index"
    opts = IndexOptions(model=str(tiny_bert), corpus=str(folder / "corpus.jsonl"), out=str(out), num_shards=3,
                        batch_size=16, precision="fp32", actors=1)
    meta = build_faiss(out, encode_corpus(opts, progress=False), "Flat", index_shards=3)
    assert len(meta["parts"]) == 3
    return folder, out


@pytest.mark.ray
def test_mine_searchers_give_the_records_of_the_default(three_part_index, tmp_path, capsys, monkeypatch):
    """`mine --searchers 2` (parts grouped 2 + 1 over two searcher actors) mines exactly what the
    default (one searcher actor per part) mines; the flag reaches the searcher core."""
    from distributed_ir import cli
    from distributed_ir.data.records import read_records
    from distributed_ir.index import searchers

    folder, index = three_part_index
    groups_seen: list[list[list[int]]] = []
    real = searchers.part_searchers

    def spy(index_dir, groups, *a, **k):
        groups_seen.append(groups)
        return real(index_dir, groups, *a, **k)

    monkeypatch.setattr(searchers, "part_searchers", spy)
    results = {}
    for name, extra in (("default", []), ("two", ["--searchers", "2"])):
        out = tmp_path / f"{name}.jsonl"
        assert cli.main(["mine", "--index", str(index), "--dataset", str(folder), "--out", str(out),
                         "--rank-start", "2", "--rank-end", "20", "--per-query", "4", "--precision", "fp32",
                         "--actors", "1", *extra]) == 0
        summary = last_json(capsys.readouterr().out)
        results[name] = read_records(out), {k: v for k, v in summary.items() if k not in ("search_seconds", "out")}
    assert groups_seen == [[[0], [1], [2]], [[0, 1], [2]]]
    (fmt, records), counts = results["two"]
    assert fmt == "triplet" and len(records) == 8 and counts["negatives"] == 8 * 4
    assert results["two"] == results["default"]


@pytest.mark.ray
def test_rerank_command_stages_the_corpus_and_equals_the_corpus_in_the_driver(beir_index, tiny_bert, tmp_path,
                                                                               capsys, monkeypatch):
    """`distributed-ir rerank`: the texts come from the dataset's corpus staged and read on Ray (this
    process never loads it), and run.trec, metrics.json and the printed report are what the
    corpus-in-the-driver path gave."""
    import pyarrow.parquet as pq

    from distributed_ir import cli
    from distributed_ir.data.beir import load_beir
    from distributed_ir.eval import rerank
    from distributed_ir.eval.fusion import fuse_runs
    from distributed_ir.eval.metrics import DEFAULT_METRICS, evaluate, read_run, write_run
    from distributed_ir.index.search import search_index
    from distributed_ir.models.cross_encoder import CrossEncoderReranker

    folder, index = beir_index
    model = str(CrossEncoderReranker.from_pretrained(str(tiny_bert), max_length=48).save(tmp_path / "ce"))
    search_index(index, folder / "queries.jsonl", tmp_path / "first.trec", top_k=20,
                 qrels_path=folder / "qrels" / "test.tsv", precision="fp32", progress=False)
    # the previous path: the corpus loaded here, its texts paired in this process
    ds = load_beir(folder, "test")
    expected, first_stage, _ = rerank.rerank_run(model, read_run(tmp_path / "first.trec"), ds.split_queries(),
                                                 ds.corpus, 12, batch_size=5, precision="fp32", actors=1)
    write_run(tmp_path / "expected.trec", expected, tag="distributed-ir-rerank")
    write_run(tmp_path / "expected_fused.trec", fuse_runs(first_stage, expected, 0.4), tag="distributed-ir-fused")

    def refuse(*a, **k):
        raise AssertionError("the rerank command's driver must not load the corpus texts")

    # In this (driver) process only: Ray workers read the staged shards and pair the texts.
    for owner, name in ((rerank, "candidate_pairs"), (pq, "read_table"), (pq, "ParquetFile")):
        monkeypatch.setattr(owner, name, refuse)
    refuse_corpus_reads(monkeypatch)  # no corpus row either: qrels doc ids are checked on the staged shards
    with pytest.raises(AssertionError, match="must not read the corpus"):  # the guard does guard
        load_beir(folder, "test")
    out = tmp_path / "rr"
    assert cli.main(["rerank", "--model", model, "--run", str(tmp_path / "first.trec"), "--dataset", str(folder),
                     "--out", str(out), "--top-k", "12", "--batch-size", "5", "--precision", "fp32", "--actors", "1",
                     "--fuse", "0.4"]) == 0
    report = last_json(capsys.readouterr().out)
    monkeypatch.undo()

    assert (out / "run.trec").read_text() == (tmp_path / "expected.trec").read_text()
    assert (out / "run_fused.trec").read_text() == (tmp_path / "expected_fused.trec").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "run.trec", "run_fused.trec"]  # stage removed
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["first_stage"] == evaluate(first_stage, ds.qrels, DEFAULT_METRICS)
    assert saved["reranked"] == evaluate(expected, ds.qrels, DEFAULT_METRICS)
    assert saved["fused"] == evaluate(fuse_runs(first_stage, expected, 0.4), ds.qrels, DEFAULT_METRICS)
    assert saved["speed"]["pairs"] == 4 * 12 and saved["fusion_weight"] == 0.4
    assert report == {k: saved[k] for k in ("first_stage", "reranked", "fused", "speed")}


@pytest.mark.ray
def test_rerank_command_checks_qrels_on_the_staged_corpus_and_leaves_no_stage_on_failure(ray_cluster, tmp_path,
                                                                                          monkeypatch):
    """A qrels row naming a document the corpus lacks is the load's `FILE:LINE` error, found on the
    staged shards (this process reads no corpus row); a corpus that fails staging leaves no
    OUT/staged_corpus behind either. Both fail before any model is loaded."""
    from distributed_ir.data.errors import DataError
    from distributed_ir.eval.rerank import STAGED_CORPUS, rerank_command

    folder = write_tiny_beir(tmp_path / "tiny")
    with (folder / "qrels" / "test.tsv").open("a") as fh:
        fh.write("q9\tdoc9\t1\nq9\tnope\t1\n")  # line 11
    (tmp_path / "first.trec").write_text("q8 Q0 doc8 1 2.0 x\nq8 Q0 doc1 2 1.0 x\n")
    args = dict(model=str(tmp_path / "no-model"), run_path=str(tmp_path / "first.trec"), dataset_dir=str(folder))
    refuse_corpus_reads(monkeypatch)
    with pytest.raises(DataError, match=r"qrels/test\.tsv:11: field 'corpus-id': unknown document id 'nope'"):
        rerank_command(out=str(tmp_path / "a"), **args)
    assert list((tmp_path / "a").iterdir()) == []
    with (folder / "corpus.jsonl").open("a") as fh:
        fh.write('{"_id": "doc3", "text": "again"}\n')  # line 49: a duplicate id fails staging
    with pytest.raises(DataError, match=r"corpus\.jsonl:49: field '_id': duplicate id 'doc3'"):
        rerank_command(out=str(tmp_path / "b"), **args)
    assert not (tmp_path / "b" / STAGED_CORPUS).exists()


@pytest.mark.ray
def test_ray_rerank_equals_in_process_scores(beir_index, tiny_bert, tmp_path, capsys):
    from distributed_ir import cli
    from distributed_ir.eval.metrics import read_run
    from distributed_ir.eval.rerank import RerankStage, candidate_pairs
    from distributed_ir.index.search import search_index
    from distributed_ir.models.cross_encoder import CrossEncoderReranker

    folder, index = beir_index
    model = CrossEncoderReranker.from_pretrained(str(tiny_bert), max_length=48).save(tmp_path / "ce")
    search_index(index, folder / "queries.jsonl", tmp_path / "first.trec", top_k=20,
                 qrels_path=folder / "qrels" / "test.tsv", precision="fp32", progress=False)
    config = {"model": str(model), "run": str(tmp_path / "first.trec"), "dataset": str(folder),
              "out": str(tmp_path / "rr"), "top_k": 10, "batch_size": 8, "precision": "fp32"}
    (tmp_path / "rerank.yaml").write_text(json.dumps(config))
    assert cli.main(["rerank", "--config", str(tmp_path / "rerank.yaml"), "actors=2", "--fuse", "0.5"]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["speed"]["pairs"] == 4 * 10 and report["reranked"]["num_queries"] == 4
    assert 1 <= report["speed"]["actors"] <= report["speed"]["max_actors"] == 2  # actors that ran vs the pool's max
    saved = json.loads((tmp_path / "rr" / "metrics.json").read_text())
    assert set(saved) >= {"first_stage", "reranked", "speed"} and "ndcg@10" in saved["reranked"]
    assert report == {k: saved[k] for k in ("first_stage", "reranked", "fused", "speed")}
    reranked = read_run(tmp_path / "rr" / "run.trec")
    # the same pairs scored in this process, in another order and batch size
    from distributed_ir.data.beir import load_beir

    ds = load_beir(folder, "test")
    pairs = candidate_pairs(read_run(tmp_path / "first.trec"), ds.split_queries(), ds.corpus, 10)
    local = RerankStage(str(model), batch_size=3, precision="fp32", device="cpu").score(pairs["query"][::-1],
                                                                                       pairs["document"][::-1])[::-1]
    ray_scores = np.array([reranked[q][d] for q, d in zip(pairs["query_id"], pairs["doc_id"])])
    np.testing.assert_allclose(ray_scores, local, atol=1e-4)
    # fusion: the fused run holds the same candidates and matches its own metrics row
    from distributed_ir.eval.metrics import DEFAULT_METRICS, evaluate

    fused = read_run(tmp_path / "rr" / "run_fused.trec")
    assert {q: set(d) for q, d in fused.items()} == {q: set(d) for q, d in reranked.items()}
    assert saved["fusion_weight"] == 0.5
    assert evaluate(fused, ds.qrels, DEFAULT_METRICS)["ndcg@10"] == pytest.approx(saved["fused"]["ndcg@10"], abs=1e-6)


@pytest.mark.ray
def test_compiled_ray_rerank_equals_eager_scores(beir_index, tiny_bert, tmp_path):
    """`rerank --compile`: the Ray actor's torch.compile'd reranker gives the eager scores."""
    from distributed_ir.data.beir import load_beir
    from distributed_ir.eval.rerank import RerankStage, candidate_pairs, rerank_with_ray
    from distributed_ir.models.cross_encoder import CrossEncoderReranker

    folder, _ = beir_index
    model = str(CrossEncoderReranker.from_pretrained(str(tiny_bert), max_length=48).save(tmp_path / "ce"))
    ds = load_beir(folder, "test")
    run = {q: {d: 1.0 / (1 + i) for i, d in enumerate(list(ds.corpus)[:10])} for q in ds.split_queries()}
    pairs = candidate_pairs(run, ds.split_queries(), ds.corpus, 10)
    compiled, _ = rerank_with_ray(model, pairs, batch_size=7, precision="fp32", actors=1, compile=True)
    # what each actor builds: a stage whose transformer runs through torch.compile
    assert RerankStage(model, device="cpu", compile=True).reranker.model._compiled_call_impl is not None
    eager = RerankStage(model, batch_size=5, precision="fp32", device="cpu").score(pairs["query"], pairs["document"])
    np.testing.assert_allclose(compiled, eager, atol=1e-4)


def test_fusion_weights_and_scales():
    from distributed_ir.eval.fusion import fuse_runs

    first = {"q": {"a": 0.9, "b": 0.8, "c": 0.1, "z": 0.05}}
    rr = {"q": {"a": -5.0, "b": 20.0, "c": 1.0}}  # logits on another scale; "z" was not reranked
    only_rr, only_fs = fuse_runs(first, rr, 1.0)["q"], fuse_runs(first, rr, 0.0)["q"]
    assert sorted(only_rr, key=only_rr.get) == ["a", "c", "b"] and sorted(only_fs, key=only_fs.get) == ["c", "b", "a"]
    half = fuse_runs(first, rr, 0.5)["q"]
    z = lambda v: (np.array(v) - np.mean(v)) / np.std(v)  # noqa: E731
    expect = 0.5 * z([-5.0, 20.0, 1.0]) + 0.5 * z([0.9, 0.8, 0.1])
    np.testing.assert_allclose([half[d] for d in "abc"], expect, atol=1e-12)
    assert fuse_runs(first, {"q": {"a": 3.0, "b": 3.0}}, 0.7)["q"]["a"] == pytest.approx(0.3 * z([0.9, 0.8])[0])
    with pytest.raises(KeyError, match="not in the first-stage run"):
        fuse_runs(first, {"q": {"x": 1.0}}, 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        fuse_runs(first, rr, 1.5)
