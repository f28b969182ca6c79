"""T2Ranking and DPR Wikipedia-NQ preparation on small inputs in the public formats (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from distributed_ir.config import InputConfig
from distributed_ir.data.beir import load_beir
from distributed_ir.data.errors import DataError
from distributed_ir.data.nq import iter_json_array, prepare_nq
from distributed_ir.data.prepare import SeenIds
from distributed_ir.data.records import read_records
from distributed_ir.data.t2ranking import prepare_t2ranking
from distributed_ir.index.corpus import expand_corpus, iter_documents
from tests.conftest import REPO
from tests.public_fixtures import EN, TOPICS, write_nq, write_t2ranking


def test_t2ranking_to_beir_and_records_accounts_for_every_row(tmp_path):
    n = write_t2ranking(tmp_path / "raw")
    stats = prepare_t2ranking(tmp_path / "raw", tmp_path / "t2", num_shards=3)
    out = tmp_path / "t2"
    train = load_beir(out, "train")
    dev = load_beir(out, "dev", base=train)
    # corpus: every non-blank passage, the tab inside a passage kept
    assert stats["corpus_rows"] == len(train.corpus) == n["passages"] - n["blank"] and stats["empty_passages"] == 1
    assert "相关\t但并不" in train.corpus["101"]
    # every qrels row is written or counted under a reason; none silently lost
    c = stats["qrels_train"]
    assert c["rows"] == n["train_rows"] == c["written"] + c["empty_passage"] + c["duplicate"]
    assert c["empty_passage"] == 1 and sum(len(d) for d in train.qrels.values()) == c["written"] == 6
    assert stats["qrels_dev"]["written"] == n["dev_rows"] == sum(len(d) for d in dev.qrels.values())
    assert train.qrels["1003"] == {"106": 1} and dev.queries["2007"] == TOPICS[7][2]
    # pair records: one per train query with its positive passage text
    fmt, pairs = read_records(out / "train_pairs.jsonl")
    assert fmt == "pair" and len(pairs) == stats["train_pairs"] == n["train_queries"]
    assert pairs[0].query == TOPICS[0][2] and pairs[0].positive == [TOPICS[0][1]]
    # triplets: judged non-relevant (grade < 2) passages as hard negatives, never a positive
    fmt, triplets = read_records(out / "train_triplets.jsonl")
    assert fmt == "triplet" and len(triplets) == n["train_queries"]
    for i, rec in enumerate(triplets):
        assert len(rec.negative) == 2 and TOPICS[i][1] not in rec.negative
        assert any(TOPICS[i][0] in neg for neg in rec.negative)
    # Parquet shards hold the corpus exactly (what `distributed-ir index` stages)
    docs = {doc_id: text for _, _, doc_id, text, _ in iter_documents(expand_corpus(str(out / "corpus_parquet")),
                                                                      InputConfig().check(out))}
    assert docs == train.corpus and len(stats["shards"]) == 3


def test_t2ranking_graded_qrels_keep_grades(tmp_path):
    write_t2ranking(tmp_path / "raw")
    prepare_t2ranking(tmp_path / "raw", tmp_path / "t2", qrels_source="graded", min_relevant=2)
    train = load_beir(tmp_path / "t2", "train")
    # grade 3 -> 2, grade 1 and 0 -> 0 (judged non-relevant): 2-3 relevant as T2Ranking defines
    assert train.qrels["1000"] == {"100": 2, "101": 0, "102": 0}
    assert load_beir(tmp_path / "t2", "dev").qrels["2006"] == {"112": 1, "113": 0}


@pytest.mark.parametrize("file, line, bad, message", [
    ("qrels.retrieval.train.tsv", 3, "1001\t102\textra", r"qrels\.retrieval\.train\.tsv:3: expected 2"),
    ("qrels.train.tsv", 2, "1000\t0\t100\tthree", r"qrels\.train\.tsv:2: field 'rel': relevance 'three'"),
    ("qrels.retrieval.dev.tsv", 2, "2006\t12345", r"qrels\.retrieval\.dev\.tsv:2: field 'pid': unknown passage id"),
    ("qrels.retrieval.dev.tsv", 2, "9\t100", r"qrels\.retrieval\.dev\.tsv:2: field 'qid': unknown query id"),
    ("collection.tsv", 4, "100\tagain", r"collection\.tsv:4: field 'pid': duplicate passage id '100'"),
    ("queries.dev.tsv", 1, "2006", r"queries\.dev\.tsv:1: expected 2"),
])
def test_t2ranking_malformed_lines_name_file_and_line(tmp_path, file, line, bad, message):
    write_t2ranking(tmp_path / "raw")
    path = tmp_path / "raw" / file
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line - 1] = bad
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        prepare_t2ranking(tmp_path / "raw", tmp_path / "t2")


def test_t2ranking_drop_unknown_counts_instead(tmp_path):
    write_t2ranking(tmp_path / "raw")
    with (tmp_path / "raw" / "qrels.retrieval.dev.tsv").open("a") as fh:
        fh.write("2006\t12345\n9\t100\n")
    stats = prepare_t2ranking(tmp_path / "raw", tmp_path / "t2", drop_unknown=True)
    c = stats["qrels_dev"]
    assert c["rows"] == 4 and c["unknown_passage"] == 1 and c["unknown_query"] == 1 and c["written"] == 2


def test_nq_to_beir_triplets_and_shards(tmp_path):
    n = write_nq(tmp_path / "raw")
    stats = prepare_nq(tmp_path / "raw", tmp_path / "nq", num_shards=4)
    out = tmp_path / "nq"
    train = load_beir(out, "train")
    dev = load_beir(out, "dev", base=train)
    assert stats["passages_read"] == stats["corpus_rows"] == len(train.corpus) == n["passages"]
    assert train.corpus["1"].startswith('Aaron Aaron ( or ; "Ahärôn")')  # CSV quotes undone, title first
    # every DPR question is accounted for: a query + record, or counted without positive
    d = stats["dpr_train"]
    assert d["questions"] == n["train_questions"] and d["without_positive"] == 1
    assert stats["train_triplets"] == n["with_positive"] == d["questions"] - d["without_positive"]
    q = stats["qrels_train"]
    assert q["positives"] == n["train_positives"] == q["written"] + q["not_in_corpus"] and q["written"] == 7
    assert train.qrels["train-0"] == {"1": 1, "13": 1} and train.qrels["train-3"] == {"4": 1}  # psg_id key
    assert dev.qrels == {"dev-0": {"7": 1}, "dev-1": {"8": 1}} and dev.queries["dev-1"] == EN[7][2]
    fmt, recs = read_records(out / "train_triplets.jsonl")
    assert fmt == "triplet" and len(recs) == 6
    assert recs[0].positive == [f"{EN[0][0]} {EN[0][1]}", "Filler 12 Filler passage number 12."]
    # hard negatives from hard_negative_ctxs, with the positive itself removed
    assert recs[0].negative == [f"{EN[1][0]} {EN[1][1]}", "Filler 10 Filler passage number 10."]
    assert sum(len(r.negative) for r in recs) == d["negatives"] == 12
    # Parquet shards: what the Ray Data index pipeline stages, equal to corpus.jsonl
    shards = expand_corpus(str(out / "corpus_parquet"))
    assert len(shards) == 4 and pq.read_schema(shards[0]).names == ["_id", "title", "text"]
    assert {i: t for _, _, i, t, _ in iter_documents(shards, InputConfig().check(out))} == train.corpus


def test_nq_corpus_limit_keeps_named_passages(tmp_path):
    write_nq(tmp_path / "raw")
    stats = prepare_nq(tmp_path / "raw", tmp_path / "nq", num_shards=2, corpus_limit=3)
    corpus = load_beir(tmp_path / "nq", "train").corpus
    # first 3 passages + positives (1..8, 13) + kept hard negatives (train fillers 11..16, dev 17, 18)
    assert set(corpus) == {str(i) for i in [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18]}
    assert stats["qrels_train"]["not_in_corpus"] == 0 and stats["corpus_rows"] == len(corpus)


def test_nq_malformed_input_names_file_and_line(tmp_path):
    write_nq(tmp_path / "raw")
    train = tmp_path / "raw" / "biencoder-nq-train.json"
    data = json.loads(train.read_text())
    del data[2]["positive_ctxs"][0]["passage_id"]
    train.write_text(json.dumps(data, indent=4))
    lines = train.read_text().splitlines()
    starts = [i + 1 for i, ln in enumerate(lines) if ln == "    {"]  # each question's first line
    with pytest.raises(DataError, match=rf"biencoder-nq-train\.json:{starts[2]}: field 'positive_ctxs\[0\]\.passage_id'"):
        prepare_nq(tmp_path / "raw", tmp_path / "nq")
    write_nq(tmp_path / "raw")
    text = train.read_text()
    train.write_text(text.replace('"question": "what is the highest', '"question" "x'))
    bad_line = text[:text.index('"question": "what is the highest')].count("\n") + 1
    with pytest.raises(DataError, match=rf"biencoder-nq-train\.json:{bad_line}: malformed JSON"):
        prepare_nq(tmp_path / "raw", tmp_path / "nq")
    psgs = tmp_path / "raw" / "psgs_w100.tsv"
    write_nq(tmp_path / "raw")
    psgs.write_text(psgs.read_text() + "31\tonly two columns\n")
    with pytest.raises(DataError, match=r"psgs_w100\.tsv:32: expected 3 tab-separated columns"):
        prepare_nq(tmp_path / "raw", tmp_path / "nq")


def test_json_array_streaming_line_numbers(tmp_path, monkeypatch):
    import distributed_ir.data.nq as nq

    monkeypatch.setattr(nq, "CHUNK", 7)  # items span many reads, a multi-byte char is split
    path = tmp_path / "a.json"
    path.write_text('[\n  {"a": "ä€"},\n\n  {"b": [1,\n 2]}, {"c": 3}\n]\n', encoding="utf-8")
    assert list(iter_json_array(path)) == [(2, {"a": "ä€"}), (4, {"b": [1, 2]}), (5, {"c": 3})]
    path.write_text('[{"a": 1},\n {"b": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:2: malformed JSON"):
        list(iter_json_array(path))
    path.write_text('[{"a": 1}\n {"b": 2}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:2: expected ','"):
        list(iter_json_array(path))


def test_seen_ids_bitmap_and_strings():
    seen = SeenIds()
    assert seen.add("21015324") and seen.add("0") and seen.add("doc-1") and seen.add("007")
    assert not seen.add("21015324") and "21015324" in seen and "21015323" not in seen and "7" not in seen
    assert seen.count == 4


@pytest.mark.parametrize("job, fixture, expect", [
    ("prepare_t2ranking.py", write_t2ranking, "train_pairs"),
    ("prepare_nq.py", write_nq, "train_triplets"),
])
def test_prepare_jobs_print_counts_and_fail_cleanly(tmp_path, job, fixture, expect):
    fixture(tmp_path / "raw")
    cmd = [sys.executable, str(REPO / "jobs" / job), "--input-dir", str(tmp_path / "raw"), "--out-dir",
           str(tmp_path / "out"), "--num-shards", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)[expect] == 6
    res = subprocess.run(cmd[:3] + [str(tmp_path / "missing")] + cmd[4:], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "error:" in res.stderr and "file not found" in res.stderr
