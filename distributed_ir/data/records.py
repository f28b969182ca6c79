"""Training records in three formats, read from JSONL or Parquet and validated per line.

- pair:    ``{"query": str, "positive": [str, ...]}``                  (in-batch negatives)
- triplet: ``{"query": str, "positive": [str, ...], "negative": [str, ...]}`` (hard + in-batch);
  optional ``"scores": [number, ...]``: a teacher's score of each positive then each negative
  (same order, ``len(positive) + len(negative)`` numbers), for distillation
- scored:  ``{"query": str, "document": str, "label": number}``          (CoSENT / BCE)

Fields are read by name, never by position.  The format is taken from the first record and
every later record must match it.  Parquet rows are reported as "line" = row number (1-based).
:class:`RecordWriter` writes them (streamed, atomic); :func:`write_records` writes a list.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import InputCheck, iter_jsonl, iter_parquet

FORMATS = ("pair", "triplet", "scored")


@dataclass
class TrainRecord:
    """A query with its positives and (possibly empty) hard negatives."""

    query: str
    positive: list[str]
    negative: list[str] = field(default_factory=list)
    scores: list[float] | None = None  # teacher scores of positive + negative, in that order


@dataclass
class ScoredRecord:
    """A (query, document) pair with a numeric relevance label."""

    query: str
    document: str
    label: float


def _iter_rows(path: Path, check: InputCheck) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".parquet":
        yield from iter_parquet(path, check)
    else:
        yield from iter_jsonl(path, check)


def _str(path: Path, line: int, row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise DataError(path, line, "missing", field=name)
    value = row[name]
    if not isinstance(value, str):
        raise DataError(path, line, f"expected a string, got {type(value).__name__}", field=name)
    if not value.strip():
        raise DataError(path, line, "empty text", field=name)
    return value


def _str_list(path: Path, line: int, row: dict, name: str, allow_empty: bool = False) -> list[str]:
    if name not in row or row[name] is None:
        raise DataError(path, line, "missing", field=name)
    value = row[name]
    if not isinstance(value, list):
        raise DataError(path, line, f"expected a list of strings, got {type(value).__name__}", field=name)
    if not value and not allow_empty:
        raise DataError(path, line, "empty list", field=name)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(path, line, f"item {i} is {type(item).__name__}, expected a string", field=name)
        if not item.strip():
            raise DataError(path, line, f"item {i} is empty text", field=name)
    return value


def detect_format(row: dict) -> str:
    """Format of a file, from its first record (every later record must match)."""
    if "document" in row or "label" in row:
        return "scored"
    return "triplet" if "negative" in row else "pair"


def parse_record(path: Path, line: int, row: dict, fmt: str) -> TrainRecord | ScoredRecord:
    """Validate one row against ``fmt``; raise DataError naming file, line and field."""
    query = _str(path, line, row, "query")
    if fmt == "scored":
        document = _str(path, line, row, "document")
        if "label" not in row or row["label"] is None:
            raise DataError(path, line, "missing", field="label")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
            raise DataError(path, line, f"expected a finite number, got {label!r}", field="label")
        return ScoredRecord(query=query, document=document, label=float(label))
    positive = _str_list(path, line, row, "positive")
    # A triplet file may hold queries for which mining found nothing: they train on in-batch
    # (and pooled random) negatives; an empty positive list is always an error.
    negative = _str_list(path, line, row, "negative", allow_empty=True) if fmt == "triplet" else []
    scores = _scores(path, line, row, len(positive) + len(negative)) if row.get("scores") is not None else None
    return TrainRecord(query=query, positive=positive, negative=negative, scores=scores)


def _scores(path: Path, line: int, row: dict, expected: int) -> list[float]:
    """Teacher scores aligned with ``positive + negative``: finite numbers, one per document."""
    value = row["scores"]
    if not isinstance(value, list):
        raise DataError(path, line, f"expected a list of numbers, got {type(value).__name__}", field="scores")
    if len(value) != expected:
        raise DataError(path, line, f"{len(value)} scores for {expected} documents (positive + negative)",
                        field="scores")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(path, line, f"item {i} is {v!r}, expected a finite number", field="scores")
    return [float(v) for v in value]


def read_records(path: str | Path, fmt: str = "auto",
                 check: InputCheck | None = None) -> tuple[str, list[TrainRecord] | list[ScoredRecord]]:
    """Read every record of a JSONL/Parquet file; returns ``(format, records)``.

    Bad rows raise, or (``check.on_error == "skip"``) are rejected and skipped.
    """
    check = check or InputCheck()
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "training file not found")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(path, None, f"unknown record format {fmt!r}; expected auto, {', '.join(FORMATS)}")
    records: list[Any] = []
    for line, row in _iter_rows(path, check):
        try:
            records.append(parse_record(path, line, row, detect_format(row) if fmt == "auto" else fmt))
        except DataError as e:
            check.reject(e, row)
            continue
        if fmt == "auto":  # the first accepted record fixes the file's format
            fmt = detect_format(row)
        check.accept(path)
    if not records:
        raise DataError(path, None, "no training records")
    return fmt, records


class RecordWriter:
    """Write records of one format as JSONL, one at a time (the one record writer).

    The file appears under its name only on :meth:`close` (written as ``PATH.tmp``, then renamed);
    :meth:`abort` deletes the partial file.  As a context manager it closes on success and aborts
    on an error.  A triplet file gives every record a ``negative`` list (possibly empty) and a pair
    file none, so the reader, which takes the format from the first record, sees one format
    throughout; ``scores`` are written where a record has them.
    """

    def __init__(self, path: str | Path, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"record format {fmt!r}: expected {', '.join(FORMATS)}")
        self.path = Path(path)
        self.fmt = fmt
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path.with_suffix(self.path.suffix + ".tmp"), "w", encoding="utf-8")

    def add(self, record: TrainRecord | ScoredRecord) -> None:
        self._fh.write(json.dumps(self._row(record), ensure_ascii=False) + "\n")
        self.count += 1

    def _row(self, rec: TrainRecord | ScoredRecord) -> dict[str, Any]:
        if (self.fmt == "scored") != isinstance(rec, ScoredRecord):
            raise ValueError(f"{self.path}: a {type(rec).__name__} in a {self.fmt} file")
        if isinstance(rec, ScoredRecord):
            return {"query": rec.query, "document": rec.document, "label": rec.label}
        row: dict[str, Any] = {"query": rec.query, "positive": list(rec.positive)}
        if self.fmt == "triplet":
            row["negative"] = list(rec.negative)
        elif rec.negative:
            raise ValueError(f"{self.path}: a record with negatives in a pair file")
        if rec.scores is not None:
            row["scores"] = list(rec.scores)
        return row

    def close(self) -> Path:
        self._fh.close()
        os.replace(self._fh.name, self.path)
        return self.path

    def abort(self) -> None:
        self._fh.close()
        Path(self._fh.name).unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def records_format(records: list[TrainRecord] | list[ScoredRecord]) -> str:
    """The file format that holds ``records``: scored, else triplet when any record has negatives."""
    if any(isinstance(r, ScoredRecord) for r in records):
        return "scored"
    return "triplet" if any(r.negative for r in records) else "pair"


def write_records(path: str | Path, records: list[TrainRecord] | list[ScoredRecord]) -> Path:
    """Write records as JSONL in :func:`records_format`'s format (atomic: temp file then rename)."""
    with RecordWriter(path, records_format(records)) as writer:
        for rec in records:
            writer.add(rec)
    return writer.path
