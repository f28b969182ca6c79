"""Training records in three formats, read from JSONL or Parquet and validated per line.

- pair:    ``{"query": str, "positive": [str, ...]}``                  (in-batch negatives)
- triplet: ``{"query": str, "positive": [str, ...], "negative": [str, ...]}`` (hard + in-batch);
  optional ``"scores": [number, ...]``: a teacher's score of each positive then each negative
  (same order, ``len(positive) + len(negative)`` numbers), for distillation
- scored:  ``{"query": str, "document": str, "label": number}``          (CoSENT / BCE)

Fields are read by name, never by position.  The format is taken from the first record and
every later record must match it.  Parquet rows are reported as "line" = row number (1-based).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_ir.data.beir import BeirDataset
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


def write_records(path: str | Path, records: list[TrainRecord] | list[ScoredRecord]) -> Path:
    """Write records as JSONL (atomic: temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    # One format per file: if any record has negatives, every record carries the field.
    triplet = any(isinstance(r, TrainRecord) and r.negative for r in records)
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            row = rec.__dict__.copy()
            if isinstance(rec, TrainRecord) and not triplet:
                row.pop("negative")
            if isinstance(rec, TrainRecord) and rec.scores is None:
                row.pop("scores")
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def pairs_from_qrels(ds: BeirDataset) -> list[TrainRecord]:
    """One pair record per query with at least one relevant (score > 0) document."""
    records = []
    for qid, text in ds.queries.items():
        rels = ds.qrels.get(qid)
        if not rels:
            continue
        positives = [ds.corpus[d] for d, rel in rels.items() if rel > 0]
        if positives:
            records.append(TrainRecord(query=text, positive=positives))
    return records
