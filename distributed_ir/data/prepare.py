"""Shared pieces for turning public releases into the project's formats, streamed.

- :func:`iter_tsv`: one validated row at a time, optional header line, errors name file:line.
- :class:`SeenIds`: membership for tens of millions of ids in little memory (a bitmap for
  integer ids, a set for the rest).
- :class:`CorpusWriter`: writes BEIR ``corpus.jsonl`` and, optionally, N Parquet shards
  (``_id``, ``title``, ``text``) that ``distributed-ir index --corpus DIR`` reads.
- :func:`write_qrels` / :func:`write_queries`: BEIR qrels TSV (with header) and queries.jsonl.
- :func:`job_parser` / :func:`run_job`: the command line every ``jobs/prepare_*.py`` shares.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ir.data.errors import DataError

PARQUET_DIR = "corpus_parquet"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(path, None, "file not found")
    return path


def iter_tsv(path: str | Path, columns: tuple[str, ...], header_names: tuple[str, ...] = (),
             last_takes_rest: bool = False, quoted: bool = False) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line, {column: value})`` for each non-blank row of a tab-separated file.

    A first line whose first field is one of ``header_names`` is a header and skipped (public
    releases ship these files with and without one). ``last_takes_rest`` lets the last column
    hold tabs. ``quoted`` parses CSV-style double quotes (DPR's ``psgs_w100.tsv``). A row with
    the wrong column count, invalid UTF-8 or an empty id (first column) is a DataError.
    """
    path = _require(Path(path))
    n = len(columns)
    for lineno, cols in (_quoted_rows(path) if quoted else _plain_rows(path, n if last_takes_rest else 0)):
        if not cols or (len(cols) == 1 and not cols[0].strip()):
            continue
        if lineno == 1 and cols[0].strip().lower() in header_names:
            continue
        if len(cols) != n:
            raise DataError(path, lineno, f"expected {n} tab-separated columns ({', '.join(columns)}), got {len(cols)}")
        row = dict(zip(columns, cols))
        row[columns[0]] = row[columns[0]].strip()
        if not row[columns[0]]:
            raise DataError(path, lineno, "empty id", field=columns[0])
        yield lineno, row


def _plain_rows(path: Path, maxcols: int) -> Iterator[tuple[int, list[str]]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(path, lineno, f"invalid UTF-8 ({e.reason} at byte {e.start})") from None
            yield lineno, line.split("\t", maxcols - 1) if maxcols else line.split("\t")


def _quoted_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = csv.reader(fh, delimiter="\t")
        try:
            for row in rows:
                yield rows.line_num, row
        except UnicodeDecodeError as e:
            raise DataError(path, rows.line_num + 1, f"invalid UTF-8 near this line ({e.reason})") from None
        except csv.Error as e:
            raise DataError(path, rows.line_num, f"malformed TSV: {e}") from None


class SeenIds:
    """A set of ids; non-negative integer ids below 2**31 cost one bit each."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._other: set[str] = set()
        self.count = 0

    @staticmethod
    def _as_int(key: str) -> int | None:
        if key.isascii() and key.isdigit() and (len(key) == 1 or key[0] != "0") and len(key) < 10:
            return int(key)
        return None

    def __contains__(self, key: str) -> bool:
        i = self._as_int(key)
        if i is None:
            return key in self._other
        return (i >> 3) < len(self._bits) and bool(self._bits[i >> 3] & (1 << (i & 7)))

    def add(self, key: str) -> bool:
        """Add ``key``; False when it was already there."""
        if key in self:
            return False
        i = self._as_int(key)
        if i is None:
            self._other.add(key)
        else:
            if (i >> 3) >= len(self._bits):
                self._bits.extend(bytes(max((i >> 3) + 1 - len(self._bits), len(self._bits) // 2)))
            self._bits[i >> 3] |= 1 << (i & 7)
        self.count += 1
        return True


class CorpusWriter:
    """Stream documents into ``corpus.jsonl`` and ``num_shards`` Parquet shards.

    Document k goes to shard ``k % num_shards``; rows are buffered ``flush_rows`` per shard.
    Files are written under temporary names and renamed by :meth:`close`.
    """

    SCHEMA = pa.schema([("_id", pa.string()), ("title", pa.string()), ("text", pa.string())])

    def __init__(self, out_dir: Path, num_shards: int = 0, flush_rows: int = 10_000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "corpus.jsonl"
        self._jsonl = open(self.jsonl_path.with_suffix(".jsonl.tmp"), "w", encoding="utf-8")
        self.num_shards = num_shards
        self.flush_rows = flush_rows
        self.count = 0
        self.shard_dir = self.out_dir / PARQUET_DIR
        self._writers: list[pq.ParquetWriter] = []
        self._buffers: list[list[tuple[str, str, str]]] = []
        if num_shards:
            self.shard_dir.mkdir(exist_ok=True)
            for old in self.shard_dir.glob("part-*.parquet"):
                old.unlink()
            self._writers = [pq.ParquetWriter(self._shard_path(i, tmp=True), self.SCHEMA) for i in range(num_shards)]
            self._buffers = [[] for _ in range(num_shards)]

    def _shard_path(self, i: int, tmp: bool = False) -> Path:
        return self.shard_dir / (f"part-{i:05d}.parquet" + (".tmp" if tmp else ""))

    def add(self, doc_id: str, title: str, text: str) -> None:
        self._jsonl.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
        if self.num_shards:
            i = self.count % self.num_shards
            self._buffers[i].append((doc_id, title, text))
            if len(self._buffers[i]) >= self.flush_rows:
                self._flush(i)
        self.count += 1

    def _flush(self, i: int) -> None:
        rows = self._buffers[i]
        if rows:
            ids, titles, texts = zip(*rows)
            self._writers[i].write_table(pa.table({"_id": ids, "title": titles, "text": texts}, schema=self.SCHEMA))
            self._buffers[i] = []

    def close(self) -> list[Path]:
        """Finish every file; returns the Parquet shard paths (empty shards are dropped)."""
        self._jsonl.close()
        os.replace(self._jsonl.name, self.jsonl_path)
        shards = []
        for i, writer in enumerate(self._writers):
            self._flush(i)
            writer.close()
            if i < self.count:
                os.replace(self._shard_path(i, tmp=True), self._shard_path(i))
                shards.append(self._shard_path(i))
            else:
                self._shard_path(i, tmp=True).unlink()
        return shards

    def abort(self) -> None:
        """Close and delete partial files after an error."""
        self._jsonl.close()
        Path(self._jsonl.name).unlink(missing_ok=True)
        for i, writer in enumerate(self._writers):
            writer.close()
            self._shard_path(i, tmp=True).unlink(missing_ok=True)


def write_queries(path: Path, queries: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for qid, text in queries.items():
            fh.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_qrels(path: Path, qrels: dict[str, dict[str, int]]) -> int:
    """BEIR qrels TSV with its header; returns the rows written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rows = 0
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, docs in qrels.items():
            for doc_id, rel in docs.items():
                fh.write(f"{qid}\t{doc_id}\t{rel}\n")
                rows += 1
    os.replace(tmp, path)
    return rows


def document(title: str, text: str) -> str:
    """A document's training text, BEIR's ``"title text"`` (what the corpus loader builds)."""
    return f"{title} {text}".strip()


def job_parser(description: str, input_help: str) -> argparse.ArgumentParser:
    """The parser a ``jobs/prepare_*.py`` starts from: ``--input-dir`` (the release) and ``--out-dir``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input-dir", required=True, help=input_help)
    parser.add_argument("--out-dir", required=True, help="BEIR folder to write (the pipeline's data_dir/dataset)")
    return parser


def run_job(name: str, parser: argparse.ArgumentParser, argv: list[str] | None,
            prepare: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Parse ``argv``, run ``prepare(args)`` and print its counts as JSON: exit status 0.

    A :class:`DataError` (bad or missing input) prints ``{name}: error: ...`` to stderr: status 2.
    """
    args = parser.parse_args(argv)
    try:
        stats = prepare(args)
    except DataError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    return 0
