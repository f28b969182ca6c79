"""Corpus staging in Ray tasks (issue #13: no driver funnel): a corpus cut into many chunks stages
exactly as one chunk per file does, line numbers stay exact, duplicates across chunks and files
name both places, and the driver process neither parses a row nor hashes an id."""

from __future__ import annotations

import io
import json
import time

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
    assert not list((tmp_path / "many").glob(staging.PIECES + "*"))  # phase 1's pieces are gone


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


# ------------------------------------------------------------------ line starts, read in blocks
class _Reads(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.bytes = 0

    def read(self, n=-1):
        block = super().read(n)
        self.bytes += len(block)
        return block


def test_line_starts_are_found_in_blocks_and_never_past_the_limit(monkeypatch):
    monkeypatch.setattr(staging, "SCAN_BYTES", 7)
    data = b'{"a": 1}\r\n\n' + b"x" * 200 + b"\n\r\n  \nlast"
    for offset in range(len(data) + 1):  # the same as reading the rest of the line, which it no longer does
        ref = io.BytesIO(data)
        ref.seek(max(offset - 1, 0))
        expected = 0 if offset == 0 else offset - 1 + len(ref.readline())
        assert staging._line_start(_Reads(data), offset) == expected
        for limit in range(offset + 1, len(data) + 1):
            fh = _Reads(data)
            got = staging._line_start(fh, offset, limit)
            assert got == (expected if expected < limit else None), (offset, limit)
            assert fh.bytes <= limit - offset + 1  # never reads past the range
    # inside the 200-byte line: a range there is empty and reads only its own bytes
    fh = _Reads(data)
    assert staging._line_start(fh, 50, 120) is None and fh.bytes == 70


def test_a_range_inside_a_long_line_is_empty_and_reads_only_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "SCAN_BYTES", 64)
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"short\n" + b"y" * 5000 + b"\nafter\n")
    assert staging._line_range(str(path), 1000, 2000, True) == (2000, 2000, 0)
    assert staging._line_range(str(path), 3, 1000, True) == (6, 5007, 1)  # the line's start: to its end
    assert staging._line_range(str(path), 4000, 5010, True) == (5007, 5013, 1)


# ------------------------------------------------------------------ chunk boundaries on awkward bytes
def _awkward_files(tmp_path):
    """CRLF lines, blank lines of every kind, a line spanning many chunks, a bad row after it, a
    last line without newline, and an empty file."""
    docs = [json.dumps(d).encode() for d in _docs("w", 30)]
    lines = [docs[0] + b"\r\n", b"\r\n", docs[1] + b"\r\n", b"\n", b"   \r\n", docs[2] + b"\r\n",
             json.dumps({"_id": "long", "text": "lengthy " * 200}).encode() + b"\r\n",
             json.dumps({"_id": "bad", "text": 5}).encode() + b"\r\n", b"\r\n"]
    for i, d in enumerate(docs[3:]):
        lines += [d + (b"\r\n" if i % 2 else b"\n")] + ([b"\r\n", b"\n"] if i % 4 == 0 else [])
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b"".join(lines).rstrip(b"\r\n"))  # the last line has no newline
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    tail = _jsonl(tmp_path / "tail.jsonl", _docs("t", 12) + [""])
    return [crlf, empty, tail]


def _cuts(size, chunk_bytes):
    n = max(1, -(-size // chunk_bytes))
    return [i * size // n for i in range(1, n)]


def _boundary_sizes(data):
    """Chunk sizes whose cuts fall at a blank line's start, inside its CRLF, just after it, inside
    the long line and inside the last line: at least one size for each."""
    blank = [i for i in range(len(data)) if (i == 0 or data[i - 1:i] == b"\n") and data[i:].split(b"\n", 1)[0].strip() == b""]
    long_at = data.index(b'{"_id": "long"')
    kinds = {"blank start": set(blank), "inside CRLF": {i + 1 for i in blank if data[i:i + 2] == b"\r\n"},
             "after blank": {i + len(data[i:].split(b"\n", 1)[0]) + 1 for i in blank},
             "long line": set(range(long_at + 1, long_at + 1500)), "last line": set(range(data.rindex(b"\n") + 2, len(data)))}
    chosen, hit = [], set()
    for size in range(40, 400):
        new = {k for k, where in kinds.items() if set(_cuts(len(data), size)) & where} - hit
        if new:
            chosen.append(size)
            hit |= new
    assert hit == set(kinds), set(kinds) - hit
    return chosen


def _rejected(rejects):
    return [(e["file"].rsplit("/", 1)[1], e["line"], e["field"], e["reason"]) for e in
            map(json.loads, rejects.read_text().splitlines())]


def test_crlf_blank_lines_long_lines_and_no_final_newline_stage_like_one_chunk(ray_cluster, tmp_path):
    files = _awkward_files(tmp_path)
    sizes = _boundary_sizes(files[0].read_bytes())
    one_check = InputCheck("skip", tmp_path / "one.rejects")
    stage_corpus(files, tmp_path / "one", 3, one_check)
    with pytest.raises(DataError) as one_err:
        stage_corpus(files, tmp_path / "one-raise", 3)
    data = files[0].read_bytes()
    bad_line = data[:data.index(b'{"_id": "bad"')].count(b"\n") + 1
    assert one_err.value.line == bad_line == 8 and _rejected(tmp_path / "one.rejects")[0][1:3] == (8, "text")
    one_summary = one_check.summary()
    assert one_summary["files"].get(str(files[1]), {"input": 0})["input"] == 0  # the empty file: no rows
    assert one_summary["accepted"] == 30 + 1 + 12 and one_summary["rejected"] == 1
    for size in sizes:
        check = InputCheck("skip", tmp_path / f"{size}.rejects")
        stage_corpus(files, tmp_path / str(size), 3, check, chunk_bytes=size)
        assert _contents(tmp_path / str(size)) == _contents(tmp_path / "one"), size
        assert check.summary() == {**one_summary, "rejects": str(tmp_path / f"{size}.rejects")}
        assert _rejected(tmp_path / f"{size}.rejects") == _rejected(tmp_path / "one.rejects")
        with pytest.raises(DataError) as err:
            stage_corpus(files, tmp_path / f"{size}-raise", 3, chunk_bytes=size)
        assert str(err.value) == str(one_err.value)
    kept = {r["doc_id"]: r["text"] for p in (tmp_path / "one").glob("shard-*") for r in pq.read_table(p).to_pylist()}
    assert kept["w29"] == "T29 body 29 word word word" and kept["long"].startswith("lengthy lengthy")  # no \r kept


# ------------------------------------------------------------------ failures and concurrent runs
def test_a_failed_task_cancels_the_others_before_the_pieces_are_removed(ray_cluster, tmp_path):
    big = _jsonl(tmp_path / "a.jsonl", _docs("a", 3000))
    broken = tmp_path / "z.jsonl"
    broken.mkdir()  # a task fails reading it: not bad input, an error of its own
    chunk_bytes = max(4096, broken.stat().st_size)  # the folder is one chunk, read by a phase-1 task
    assert big.stat().st_size > 8 * chunk_bytes
    with pytest.raises(IsADirectoryError):
        stage_corpus([big, broken], tmp_path / "stage", 4, chunk_bytes=chunk_bytes)
    for _ in range(2):  # and nothing comes back afterwards
        assert not list((tmp_path / "stage").glob(staging.PIECES + "*"))
        assert not list((tmp_path / "stage").glob("shard-*"))
        time.sleep(1.0)


def test_cancel_and_wait_stops_a_running_task(ray_cluster, tmp_path):
    import ray

    @ray.remote(num_cpus=0.5)
    def slow(path):
        time.sleep(3)
        open(path, "w").write("written after the cleanup")

    ref = slow.remote(str(tmp_path / "late"))
    time.sleep(1.0)
    t0 = time.monotonic()
    staging.cancel_and_wait([ref], wait_s=30)
    assert time.monotonic() - t0 < 10
    time.sleep(3.5)
    assert not (tmp_path / "late").exists()


def test_another_runs_pieces_are_left_alone(ray_cluster, files, tmp_path, capfd):
    stage = tmp_path / "stage"
    other = stage / f"{staging.PIECES}-0123456789abcdef"  # a staging running now (or killed)
    other.mkdir(parents=True)
    (other / "b00000-c0000000.parquet").write_bytes(b"theirs")
    stage_corpus(files, stage, 4, chunk_bytes=256)
    assert (other / "b00000-c0000000.parquet").read_bytes() == b"theirs"
    assert [p.name for p in stage.glob(staging.PIECES + "*")] == [other.name]  # ours is gone
    assert other.name in capfd.readouterr().err
    assert _contents(stage) == _contents_of(files, tmp_path / "ref")


def _contents_of(files, folder):
    stage_corpus(files, folder, 4)
    return _contents(folder)


# ------------------------------------------------------------------ text that is not Unicode
@pytest.mark.parametrize("row, field, where", [({"_id": "\ud800", "text": "x"}, "_id", "'\\\\ud800' at character 0"),
                                               ({"_id": "s", "text": "caf\u00e9\udc00"}, "text", "'\\\\udc00' at character 4")])
def test_a_lone_surrogate_names_file_line_and_field(ray_cluster, files, tmp_path, row, field, where):
    a = files[0]
    lines = a.read_text().splitlines()
    lines[60] = json.dumps(row)  # line 61, in a later chunk: valid JSON, not Unicode text
    a.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"a\.jsonl:61: field '{field}': not valid Unicode text: a lone surrogate {where}"):
        stage_corpus(files, tmp_path / "raise", 4, chunk_bytes=256)
    rejects = tmp_path / "rejects.jsonl"
    check = InputCheck("skip", rejects)
    shards, _ = stage_corpus(files, tmp_path / "skip", 4, check, chunk_bytes=256)
    s = check.summary()
    assert (s["input"], s["accepted"], s["rejected"]) == (220, 219, 1) and sum(x.count for x in shards) == 219
    assert [e[1:3] for e in _rejected(rejects)] == [(61, field)]
    assert "\\ud8" in rejects.read_text() or "\\udc" in rejects.read_text()  # the excerpt, escaped
