"""BEIR and training-record readers: good input parses; every bad input names file and line."""

from __future__ import annotations

import json
import re

import pytest

from distributed_ir.data import DataError, load_beir, load_corpus, load_qrels, load_queries, read_records
from distributed_ir.data.beir import BeirDataset
from distributed_ir.data.records import RecordWriter, ScoredRecord, TrainRecord, write_records
from distributed_ir.mining import pairs_from_qrels


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def beir(tmp_path):
    d = tmp_path / "ds"
    (d / "qrels").mkdir(parents=True)
    _write(d / "corpus.jsonl", [json.dumps({"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i}"}) for i in range(5)])
    _write(d / "queries.jsonl", [json.dumps({"_id": f"q{i}", "text": f"query {i}"}) for i in range(3)])
    _write(d / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q0\td0\t2", "q0\td1\t1", "q1\td2\t0", "q2\td3\t1"])
    return d


def test_load_beir(beir):
    ds = load_beir(beir, "test")
    assert ds.corpus["d0"] == "T0 doc 0"
    assert ds.qrels == {"q0": {"d0": 2, "d1": 1}, "q1": {"d2": 0}, "q2": {"d3": 1}}
    assert list(ds.split_queries()) == ["q0", "q1", "q2"]
    pairs = pairs_from_qrels(ds)
    # q1 has only a zero-relevance judgement: no pair record
    assert [(p.query, p.positive) for p in pairs] == [("query 0", ["T0 doc 0", "T1 doc 1"]), ("query 2", ["T3 doc 3"])]


@pytest.mark.parametrize("line, message", [
    ('{"_id": "x", "text": "a"', "malformed JSON"),
    ('{"text": "a"}', "field '_id': missing"),
    ('{"_id": "", "text": "a"}', "empty id"),
    ('{"_id": "d0", "text": "dup"}', "duplicate id 'd0' \\(first on line 1\\)"),
    ('{"_id": "x", "text": 5}', "field 'text': expected a string"),
    ('{"_id": "x", "title": "", "text": "  "}', "empty document"),
    ('{"_id": ["x"], "text": "a"}', "field '_id': expected a string id"),
    ('[1, 2]', "expected a JSON object"),
])
def test_corpus_errors_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "corpus.jsonl", [json.dumps({"_id": "d0", "text": "ok"}), line])
    with pytest.raises(DataError, match=rf"corpus\.jsonl:2: .*{message}"):
        load_corpus(path)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_bytes(b'{"_id": "q0", "text": "ok"}\n{"_id": "q1", "text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"queries\.jsonl:2: field 'text': invalid UTF-8"):
        load_queries(path)


def test_empty_query_text(tmp_path):
    path = _write(tmp_path / "queries.jsonl", ['{"_id": "q0", "text": ""}'])
    with pytest.raises(DataError, match=r"queries\.jsonl:1: field 'text': empty query text"):
        load_queries(path)


@pytest.mark.parametrize("row, message", [
    ("q9\td0\t1", "field 'query-id': unknown query id 'q9'"),
    ("q0\td9\t1", "field 'corpus-id': unknown document id 'd9'"),
    ("q0\td0\thigh", "field 'score': relevance 'high' is not an integer"),
    ("q0\td0", "expected 3 tab-separated columns"),
])
def test_qrels_errors(beir, row, message):
    _write(beir / "qrels" / "bad.tsv", ["query-id\tcorpus-id\tscore", "q0\td0\t1", row])
    with pytest.raises(DataError, match=rf"bad\.tsv:3: {message}"):
        load_beir(beir, "bad")


def test_qrels_trec_format(tmp_path):
    path = _write(tmp_path / "qrels.txt", ["q0 0 d0 1", "q0 0 d1 0"])
    assert load_qrels(path) == {"q0": {"d0": 1, "d1": 0}}


def test_missing_beir_files_say_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"missing corpus\.jsonl, queries\.jsonl, qrels/test\.tsv"):
        load_beir(tmp_path, "test")


@pytest.mark.parametrize("split", ["../../etc/passwd", "..", "sub/b", "/abs"])
def test_split_and_dataset_names_stay_inside_the_folder(beir, split):
    from distributed_ir.data.beir import ensure_beir

    (beir / "qrels" / "sub").mkdir()
    (beir / "qrels" / "sub" / "b.tsv").write_text((beir / "qrels" / "test.tsv").read_text())
    with pytest.raises(DataError, match=rf"field 'split': {re.escape(repr(split))} is not a plain name"):
        load_beir(beir, split)
    with pytest.raises(DataError, match=rf"field 'dataset': {re.escape(repr(split))} is not a plain name"):
        ensure_beir(beir, split)  # before any download


@pytest.mark.parametrize("row, message", [
    ({"query": "q", "positive": []}, "field 'positive': empty list"),
    ({"query": "q"}, "field 'positive': missing"),
    ({"query": "q", "positive": "doc"}, "field 'positive': expected a list of strings"),
    ({"query": 3, "positive": ["d"]}, "field 'query': expected a string"),
    ({"query": " ", "positive": ["d"]}, "field 'query': empty text"),
    ({"query": "q", "positive": ["d", 7]}, "field 'positive': item 1 is int"),
])
def test_pair_record_errors(tmp_path, row, message):
    path = _write(tmp_path / "train.jsonl", [json.dumps({"query": "ok", "positive": ["doc"]}), json.dumps(row)])
    with pytest.raises(DataError, match=rf"train\.jsonl:2: {message}"):
        read_records(path)


def test_triplet_negative_list_may_be_empty_but_not_missing(tmp_path):
    path = _write(tmp_path / "t.jsonl", [json.dumps({"query": "q", "positive": ["p"], "negative": ["n"]}),
                                          json.dumps({"query": "q", "positive": ["p"], "negative": []}),
                                          json.dumps({"query": "q", "positive": ["p"]})])
    with pytest.raises(DataError, match=r"t\.jsonl:3: field 'negative': missing"):
        read_records(path)


def test_mixed_records_written_as_one_format(tmp_path):
    """A mined file where some queries got no negatives keeps every negative when read back."""
    recs = [TrainRecord("q1", ["p1"]), TrainRecord("q2", ["p2"], ["n2"])]
    write_records(tmp_path / "m.jsonl", recs)
    assert read_records(tmp_path / "m.jsonl") == ("triplet", recs)


def test_record_writer_streams_one_format_and_leaves_nothing_on_error(tmp_path):
    """The one record writer: the file appears only when complete; a record that does not fit the
    file's format is refused (a pair file silently losing negatives would train on less)."""
    with RecordWriter(tmp_path / "sub" / "p.jsonl", "pair") as writer:
        writer.add(TrainRecord("q1", ["p1"], scores=[0.5]))
        assert not (tmp_path / "sub" / "p.jsonl").exists()
    assert [json.loads(line) for line in (tmp_path / "sub" / "p.jsonl").read_text().splitlines()] == [
        {"query": "q1", "positive": ["p1"], "scores": [0.5]}]
    with pytest.raises(ValueError, match="negatives in a pair file"):
        with RecordWriter(tmp_path / "bad.jsonl", "pair") as writer:
            writer.add(TrainRecord("q1", ["p1"]))
            writer.add(TrainRecord("q2", ["p2"], ["n2"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # neither bad.jsonl nor its temp file
    with pytest.raises(ValueError, match="ScoredRecord in a triplet file"):
        RecordWriter(tmp_path / "t.jsonl", "triplet").add(ScoredRecord("q", "d", 1.0))


@pytest.mark.parametrize("label", ["high", None, True, float("nan")])
def test_scored_label_must_be_number(tmp_path, label):
    path = _write(tmp_path / "s.jsonl", [json.dumps({"query": "q", "document": "d", "label": 1}),
                                          json.dumps({"query": "q", "document": "d", "label": label})])
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'label'"):
        read_records(path)


def test_formats_roundtrip_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"query": "q1", "positive": ["p1"], "negative": ["n1", "n2"]}, {"query": "q2", "positive": ["p2"], "negative": ["n3"]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    fmt, recs = read_records(tmp_path / "t.parquet")
    assert fmt == "triplet" and recs[0].negative == ["n1", "n2"]
    write_records(tmp_path / "t.jsonl", recs)
    assert read_records(tmp_path / "t.jsonl") == ("triplet", recs)
    pq.write_table(pa.Table.from_pylist([{"query": "q", "document": "d", "label": 0.5},
                                         {"query": "q", "document": None, "label": 1.0}]), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s\.parquet:2: field 'document': missing"):
        read_records(tmp_path / "s.parquet")


def test_mined_negatives_never_include_judged_docs():
    ds = BeirDataset(corpus={f"d{i}": f"text {i}" for i in range(20)}, queries={"q0": "a", "q1": "b"},
                     qrels={"q0": {"d3": 1, "d5": 0}, "q1": {"d0": 1}})
    run = {"q0": [f"d{i}" for i in range(20)], "q1": [f"d{i}" for i in range(19, -1, -1)]}
    from distributed_ir.mining import mine_negatives

    records, counts, _ = mine_negatives(ds, run, rank_start=2, rank_end=10, per_query=4)
    assert counts == {"queries": 2, "negatives": 8, "dropped_positives": 2, "dropped_duplicate_text": 0,
                      "without_negatives": 0}
    for rec in records:
        assert not set(rec.negative) & {"text 3", "text 5"} if rec.query == "a" else "text 0" not in rec.negative
        assert len(rec.negative) == 4
    assert [(r.query, r.positive) for r in records] == [("a", ["text 3"]), ("b", ["text 0"])]
    # negatives come from ranks 2..9 of their own query's run, judged documents left out
    assert set(records[0].negative) <= {f"text {i}" for i in (2, 4, 6, 7, 8, 9)}
    assert set(records[1].negative) <= {f"text {i}" for i in range(10, 18)}
