"""Corpus staging in Ray tasks (issue #13: no driver funnel): a corpus cut into many chunks stages
exactly as one chunk per file does, line numbers stay exact, duplicates across chunks and files
name both places, and the driver process neither parses a row nor hashes an id."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import InputCheck
from distributed_ir.index import corpus as corpus_mod
from distributed_ir.index import staging
from distributed_ir.index.corpus import ids_digest, iter_documents, stage_corpus
from distributed_ir.index.staging import id_hash, plan_chunks

pytestmark = pytest.mark.ray


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _docs(prefix, n):
    return [{"_id": f"{prefix}{i}", "title": f"T{i}", "text": f"body {i} " + "word " * (i % 13)} for i in range(n)]


@pytest.fixture()
def files(tmp_path):
    rows = _docs("a", 120)
    rows.insert(7, "")  # a blank line still counts as a line
    a = _jsonl(tmp_path / "a.jsonl", rows)
    b = _jsonl(tmp_path / "b.jsonl", _docs("b", 60))
    c = tmp_path / "c.parquet"
    pq.write_table(pa.table({"doc_id": [f"c{i}" for i in range(40)], "text": [f"parquet {i}" for i in range(40)]}),
                   c, row_group_size=7)
    return [a, b, c]


def _contents(stage_dir):
    return {p.name: sorted(pq.read_table(p, columns=["doc_id", "text", "shard"]).to_pylist(), key=str)
            for p in sorted(stage_dir.glob("shard-*.parquet"))}


def _refuse(*a, **k):
    raise AssertionError("the driver must not read or hash documents")


def test_many_chunks_stage_like_one_and_the_driver_reads_no_document(ray_cluster, files, tmp_path, monkeypatch):
    one, _ = stage_corpus(files, tmp_path / "one", 4)
    chunks = plan_chunks(files, 256)
    assert len(chunks) >= 10 and {c.file for c in chunks} == {0, 1, 2}
    for c in chunks:  # every chunk starts on a line start whose number is exact
        if not c.parquet:
            data = files[c.file].read_bytes()
            assert c.start == 0 or data[c.start - 1:c.start] == b"\n"
            assert c.first == data[:c.start].count(b"\n") + 1
    assert [c.first for c in chunks if c.parquet] == [1, 8, 15, 22, 29, 36]
    # in this (driver) process only: the Ray tasks import the real functions
    for module, name in ((staging, "iter_chunk"), (staging, "iter_jsonl"), (staging, "iter_parquet"),
                         (staging, "id_hash"), (corpus_mod, "iter_documents"), (corpus_mod, "iter_chunk")):
        monkeypatch.setattr(module, name, _refuse)
    many, _ = stage_corpus(files, tmp_path / "many", 4, chunk_bytes=256)
    monkeypatch.undo()
    assert [(s.index, s.file, s.count, s.ids_digest) for s in many] == \
        [(s.index, s.file, s.count, s.ids_digest) for s in one]
    assert _contents(tmp_path / "many") == _contents(tmp_path / "one")
    # shard b holds exactly the documents whose id hashes to b, with the text iter_documents gives
    docs = {d: t for _, _, d, t, _ in iter_documents(files, InputCheck())}
    assert len(docs) == 220 == sum(s.count for s in many)
    for s in many:
        expected = [{"doc_id": d, "text": t, "shard": s.index} for d, t in docs.items() if id_hash(d) % 4 == s.index]
        assert _contents(tmp_path / "many")[s.file] == sorted(expected, key=str)
        assert s.ids_digest == ids_digest(d for d in docs if id_hash(d) % 4 == s.index)
    assert not (tmp_path / "many" / staging.PIECES).exists()  # phase 1's pieces are gone


def test_raise_names_the_earliest_bad_row_across_chunks(ray_cluster, files, tmp_path):
    a, b, c = files
    lines = a.read_text().splitlines()
    lines[60] = '{"_id": "broken", '  # line 61, in a later chunk of a.jsonl
    lines[100] = json.dumps({"_id": "a5", "text": "again"})  # line 101: a duplicate of line 6
    a.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:61: malformed JSON") as err:
        stage_corpus(files, tmp_path / "s1", 4, chunk_bytes=256)
    assert err.value.line == 61
    lines[40] = json.dumps({"_id": "a90", "text": "early"})  # a90 now first at line 41: line 92 repeats it
    lines[50] = json.dumps({"_id": "a2", "text": "early duplicate"})  # line 51 repeats line 3: before line 61
    a.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl:51: field '_id': duplicate id 'a2', first at .*a\.jsonl:3$"):
        stage_corpus(files, tmp_path / "s2", 4, chunk_bytes=256)
    assert not list((tmp_path / "s2").glob("shard-*")) and not (tmp_path / "s2" / "stage.json").exists()


def test_duplicates_across_chunks_and_files_skip_counts_and_rejects(ray_cluster, files, tmp_path):
    a, b, c = files
    rows = _docs("b", 60)
    rows[45] = {"_id": "a100", "text": "from another file"}  # b.jsonl:46 repeats a.jsonl:102
    rows[50] = {"_id": "b3", "text": "same file, another chunk"}  # b.jsonl:51 repeats b.jsonl:4
    rows[55] = {"_id": "b9", "text": 5}  # b.jsonl:56: not a string
    _jsonl(b, rows)
    pq.write_table(pa.table({"doc_id": [f"c{i}" for i in range(39)] + ["b20"],
                             "text": [f"parquet {i}" for i in range(39)] + ["parquet dup"]}), c, row_group_size=7)
    with pytest.raises(DataError, match=r"b\.jsonl:46: field '_id': duplicate id 'a100', first at .*a\.jsonl:102"):
        stage_corpus(files, tmp_path / "raise", 3, chunk_bytes=256)
    rejects = tmp_path / "rejects.jsonl"
    check = InputCheck("skip", rejects)
    shards, _ = stage_corpus(files, tmp_path / "skip", 3, check, chunk_bytes=256)
    summary = check.summary()
    assert (summary["input"], summary["accepted"], summary["rejected"]) == (220, 216, 4)
    for counts in summary["files"].values():
        assert counts["input"] == counts["accepted"] + counts["rejected"]
    assert sum(s.count for s in shards) == summary["accepted"]
    entries = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [(e["file"].rsplit("/", 1)[1], e["line"], e["field"]) for e in entries] == \
        [("b.jsonl", 46, "_id"), ("b.jsonl", 51, "_id"), ("b.jsonl", 56, "text"), ("c.parquet", 40, "_id")]
    assert entries[0]["reason"] == f"duplicate id 'a100', first at {a}:102"
    assert entries[1]["reason"] == f"duplicate id 'b3', first at {b}:4"
    assert entries[3]["reason"] == f"duplicate id 'b20', first at {b}:21"
    assert json.loads(entries[0]["excerpt"])["text"] == "from another file"
    meta = json.loads((tmp_path / "skip" / "stage.json").read_text())
    assert meta["num_docs"] == 216 and meta["input"][str(b)] == {"input": 60, "accepted": 57, "rejected": 3}
    # the first occurrence is the one kept
    kept = {r["doc_id"]: r["text"] for s in shards
            for r in pq.read_table(tmp_path / "skip" / s.file).to_pylist()}
    assert kept["a100"].startswith("T100 body 100") and kept["b3"].startswith("T3 body 3")
    assert kept["b20"].startswith("T20 body 20") and kept["b9"].startswith("T9 body 9")
