"""Wikipedia-NQ as released with DPR -> a BEIR folder, triplet records and Parquet corpus shards.

Inputs (https://github.com/facebookresearch/DPR, ``dpr/data/download_data.py``):

- ``biencoder-nq-train.json`` / ``biencoder-nq-dev.json`` (``download_data.py`` saves them as
  ``data/retriever/nq-{train,dev}.json``; both names are accepted): one JSON list of questions
  ``{"question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"}``; each
  context is ``{"title", "text", "passage_id"}`` (some releases say ``psg_id``).
- ``psgs_w100.tsv``: ``id  text  title`` with a header line, 21,015,324 passages of 100 words,
  CSV-style double quotes.

Output (``out_dir``): ``corpus.jsonl`` and ``corpus_parquet/part-*.parquet`` (``_id``, ``title``,
``text``: ``distributed-ir index --corpus OUT/corpus_parquet``), ``queries.jsonl`` (ids
``train-N`` / ``dev-N``, N = position in the DPR file), ``qrels/{train,dev}.tsv`` (positive
passage ids found in the corpus, score 1), ``train_triplets.jsonl`` (query, positive texts, hard
negatives from ``hard_negative_ctxs``) and ``prepare_stats.json``.

Everything is streamed: the DPR lists are parsed one question at a time and ``psgs_w100.tsv``
one row at a time; memory holds a bitmap of passage ids and the positive ids per question.
``corpus_limit`` keeps a subset (the first N passages plus every passage a question names) for
runs that evaluate in one process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed_ir.data.errors import DataError
from distributed_ir.data.prepare import (
    CorpusWriter,
    SeenIds,
    document,
    iter_tsv,
    write_qrels,
    write_queries,
)
from distributed_ir.data.records import RecordWriter, TrainRecord

CHUNK = 1 << 20
MAX_OBJECT = 256 << 20  # one question larger than this is not DPR data
# The dl.fbaipublicfiles name, and the name DPR's download_data.py gives it (data/retriever/).
DPR_FILES = {split: (f"biencoder-nq-{split}.json", f"nq-{split}.json") for split in ("train", "dev")}


def dpr_file(folder: Path, split: str) -> Path:
    """The split's DPR file in ``folder`` under either released name (the first when neither)."""
    names = DPR_FILES[split]
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[0])


def iter_json_array(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, item)`` for each item of a top-level JSON list, reading 1 MiB at a time."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    decoder = json.JSONDecoder()
    with open(path, "rb") as fh:
        buf, pos, line, eof = "", 0, 1, False
        tail = b""

        def more() -> bool:
            nonlocal buf, pos, eof, tail
            data = fh.read(CHUNK)
            if not data:
                eof = True
                if tail:
                    raise DataError(path, line, "invalid UTF-8 at end of file")
                return False
            data, tail = tail + data, b""
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.start < len(data) - 3:
                    raise DataError(path, line + buf[pos:].count("\n") + data[:e.start].count(b"\n"),
                                    f"invalid UTF-8 ({e.reason})") from None
                text, tail = data[:e.start].decode("utf-8"), data[e.start:]  # a split character
            buf = buf[pos:] + text
            pos = 0
            return True

        def skip_space() -> str:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        if skip_space() != "[":
            raise DataError(path, line, "expected a JSON list of questions ('[' ...)")
        pos += 1
        first = True
        while True:
            c = skip_space()
            if c == "]":
                return
            if not first:
                if c != ",":
                    raise DataError(path, line, f"expected ',' or ']' between items, got {c or 'end of file'!r}")
                pos += 1
                c = skip_space()
            if not c:
                raise DataError(path, line, "unexpected end of file inside the list")
            first = False
            while True:
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    # Usually the item continues past the buffer: read more and retry.
                    if len(buf) - pos > MAX_OBJECT or not more():
                        raise DataError(path, line + e.doc.count("\n", pos, e.pos),
                                        f"malformed JSON: {e.msg}") from None
            yield line, item
            line += buf.count("\n", pos, end)
            pos = end


def _ctx(path: Path, line: int, ctx: Any, where: str, need_id: bool) -> tuple[str | None, str]:
    """``(passage_id, "title text")`` of one DPR context, validated."""
    if not isinstance(ctx, dict):
        raise DataError(path, line, f"expected an object, got {type(ctx).__name__}", field=where)
    for key in ("title", "text"):
        if not isinstance(ctx.get(key, ""), str):
            raise DataError(path, line, f"expected a string, got {type(ctx[key]).__name__}", field=f"{where}.{key}")
    text = document(ctx.get("title", ""), ctx.get("text", ""))
    if not text:
        raise DataError(path, line, "empty title and text", field=f"{where}.text")
    pid = ctx.get("passage_id", ctx.get("psg_id"))
    if pid is None or isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        if need_id:
            raise DataError(path, line, "missing passage id (passage_id or psg_id)", field=f"{where}.passage_id")
        return None, text
    return str(pid).strip(), text


def _contexts(path: Path, line: int, obj: dict, key: str, need_id: bool) -> list[tuple[str | None, str]]:
    value = obj.get(key, [])
    if value is None:
        value = []
    if not isinstance(value, list):
        raise DataError(path, line, f"expected a list, got {type(value).__name__}", field=key)
    return [_ctx(path, line, c, f"{key}[{i}]", need_id) for i, c in enumerate(value)]


def read_questions(path: Path, split: str, records: RecordWriter | None, negatives_per_query: int,
                   stats: dict[str, int]) -> tuple[dict[str, str], dict[str, list[str]], set[str]]:
    """Stream one DPR file: queries, positive passage ids per query, every passage id named.

    Triplet records are written as questions are read (``records``; train split only).
    """
    queries: dict[str, str] = {}
    positives: dict[str, list[str]] = {}
    named: set[str] = set()
    for n, (line, obj) in enumerate(iter_json_array(path)):
        stats["questions"] += 1
        if not isinstance(obj, dict):
            raise DataError(path, line, f"expected a question object, got {type(obj).__name__}")
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(path, line, "missing or empty question", field="question")
        pos = _contexts(path, line, obj, "positive_ctxs", need_id=True)
        hard = _contexts(path, line, obj, "hard_negative_ctxs", need_id=False)
        if not pos:
            stats["without_positive"] += 1  # DPR keeps a few; nothing to train or judge
            continue
        qid = f"{split}-{n}"
        queries[qid] = question.strip()
        pos_ids = list(dict.fromkeys(pid for pid, _ in pos))
        positives[qid] = pos_ids
        named.update(pos_ids)
        negs = [(pid, text) for pid, text in hard if pid not in pos_ids][:negatives_per_query]
        named.update(pid for pid, _ in negs if pid)
        if records is not None:
            records.add(TrainRecord(queries[qid], [text for _, text in pos], [text for _, text in negs]))
            stats["negatives"] += len(negs)
    return queries, positives, named


def prepare_nq(input_dir: str | Path, out_dir: str | Path, num_shards: int = 16, negatives_per_query: int = 8,
               corpus_limit: int = 0, passages: str = "psgs_w100.tsv") -> dict[str, Any]:
    """Convert DPR's NQ files in ``input_dir``; returns (and writes) the counts.

    ``corpus_limit`` > 0 keeps the first N passages plus every passage a question names
    (positives, kept hard negatives); 0 keeps all 21M.
    """
    src, out = Path(input_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"input_dir": str(src), "corpus_limit": corpus_limit}
    splits = [s for s in DPR_FILES if s == "train" or dpr_file(src, s).is_file()]
    queries, positives, named = _read_dpr_splits(src, out, splits, negatives_per_query, stats)
    kept = _stream_passages(src / passages, out, num_shards, corpus_limit, named, stats)
    _write_judged(out, splits, queries, positives, kept, stats)
    (out / "prepare_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


def _read_dpr_splits(src: Path, out: Path, splits: list[str], negatives_per_query: int, stats: dict[str, Any],
                     ) -> tuple[dict[str, str], dict[str, dict[str, list[str]]], set[str]]:
    """Every split's questions and positives; train's hard negatives go to ``train_triplets.jsonl``.
    Returns (queries, positives by split, every passage id a question names)."""
    queries: dict[str, str] = {}
    positives: dict[str, dict[str, list[str]]] = {}
    named: set[str] = set()
    for split in splits:
        c = {"questions": 0, "without_positive": 0, "negatives": 0}
        if split == "train":
            with RecordWriter(out / "train_triplets.jsonl", "triplet") as records:
                q, positives[split], names = read_questions(dpr_file(src, split), split, records,
                                                            negatives_per_query, c)
            stats["train_triplets"] = records.count
        else:
            q, positives[split], names = read_questions(dpr_file(src, split), split, None, negatives_per_query, c)
        queries.update(q)
        named |= names
        stats[f"dpr_{split}"] = c
    return queries, positives, named


def _stream_passages(psgs: Path, out: Path, num_shards: int, corpus_limit: int, named: set[str],
                     stats: dict[str, Any]) -> SeenIds:
    """Stream the passages into corpus.jsonl + Parquet shards; returns the ids kept."""
    kept = SeenIds()
    seen = SeenIds()
    writer = CorpusWriter(out, num_shards)
    rows = 0
    try:
        for line, row in iter_tsv(psgs, ("id", "text", "title"), ("id",), quoted=True):
            rows += 1
            pid = row["id"]
            if not seen.add(pid):
                raise DataError(psgs, line, f"duplicate passage id {pid!r}", field="id")
            if corpus_limit and rows > corpus_limit and pid not in named:
                continue
            if not document(row["title"], row["text"]):
                raise DataError(psgs, line, "empty title and text", field="text")
            writer.add(pid, row["title"], row["text"])
            kept.add(pid)
    except BaseException:
        writer.abort()
        raise
    stats["shards"] = [str(p) for p in writer.close()]
    stats["passages_read"] = rows
    stats["corpus_rows"] = writer.count
    return kept


def _write_judged(out: Path, splits: list[str], queries: dict[str, str], positives: dict[str, dict[str, list[str]]],
                  kept: SeenIds, stats: dict[str, Any]) -> None:
    """qrels: each question's positives that are in the corpus (the rest counted); the questions kept."""
    kept_queries: dict[str, str] = {}
    for split in splits:
        qrels: dict[str, dict[str, int]] = {}
        c = {"positives": 0, "written": 0, "not_in_corpus": 0, "queries_without_judged_passage": 0}
        for qid, ids in positives[split].items():
            c["positives"] += len(ids)
            found = [pid for pid in ids if pid in kept]
            c["not_in_corpus"] += len(ids) - len(found)
            if not found:
                c["queries_without_judged_passage"] += 1
                continue
            qrels[qid] = {pid: 1 for pid in found}
            kept_queries[qid] = queries[qid]
            c["written"] += len(found)
        write_qrels(out / "qrels" / f"{split}.tsv", qrels)
        stats[f"qrels_{split}"] = c
    write_queries(out / "queries.jsonl", kept_queries)
    stats["queries_written"] = len(kept_queries)
