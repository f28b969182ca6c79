"""Corpus staging in Ray tasks: no process reads the whole corpus, none holds every document id.

    plan     (driver: file sizes, Parquet footers) a JSONL file is cut into byte ranges of about
             ``chunk_bytes``, each aligned to a line start; a Parquet file into runs of row groups
    lines    (a Ray task per cut JSONL range) aligns it and counts its newlines: the driver's prefix
             sums give each range's first line number, so FILE:LINE stays exact
    phase 1  (a Ray task per chunk) reads and validates its rows as :func:`iter_chunk` does, hashes
             each valid row's id (blake2b, stable across processes) into one of ``num_shards``
             buckets and writes one piece per bucket (doc_id, text, line) under ``pieces-<run>/``
    phase 2  (a Ray task per bucket) reads its pieces in input order, rejects a repeated id naming
             the first place, writes ``shard-B.parquet`` (runs of FLUSH rows sorted by length)
             atomically and returns its count and ids digest
    driver   merges metadata only: counts per file, rejects in input order, the earliest error

Every id hashes to exactly one bucket, so the per-bucket duplicate check is the corpus-wide one.
With ``on_error=raise`` a task stops at its first bad row and returns it; the driver raises the one
earliest in input order (a duplicate counts where its second occurrence is). Corpus files are read
by the tasks: on a multi-node cluster they must be at the same path on every node (shared storage),
as the model folder must be for the encode actors.

Each run writes its pieces to a folder of its own (``pieces-<random>``), removed when it ends, so two
stagings into one stage folder do not delete each other's pieces. A killed driver cannot clean up:
its folder stays, and a later run only warns about it (it cannot tell a dead run's folder from a
live one's); remove such folders by hand when no staging runs. On a failure, the tasks still
running are cancelled and waited for before the pieces are removed.
"""

from __future__ import annotations

import hashlib
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distributed_ir.data.beir import _id, document_text
from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import InputCheck, excerpt, iter_jsonl, iter_parquet, reject_entry
from distributed_ir.index.storage import Location

CHUNK_BYTES = 64 << 20  # input per phase-1 task (JSONL bytes, Parquet uncompressed row-group bytes)
FLUSH = 8192  # rows per length-sorted run in a staged shard
PIECES = "pieces"  # phase 1's output: ``pieces-<run>`` inside the stage folder, removed once staging ends
SCAN_BYTES = 1 << 20  # block size when looking for a line start
CANCEL_WAIT_S = 60.0  # how long a failed staging waits for its cancelled tasks before killing them
STAGE_CPUS = 0.5  # parsing is CPU work, but leave room beside other tasks on a small cluster
SCHEMA = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("shard", pa.int32())])


@dataclass(frozen=True)
class Chunk:
    """Part of corpus file number ``file`` (``path``): JSONL bytes ``[start, end)`` (None: to the end)
    whose first line is ``first``, or Parquet row groups ``[start, end)`` whose first row is ``first``."""

    index: int
    file: int
    path: str
    start: int = 0
    end: int | None = None
    first: int = 1
    parquet: bool = False


def id_hash(doc_id: str) -> int:
    """A document id's 64-bit hash: the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(str(doc_id).encode(), digest_size=8).digest(), "little")


def iter_chunk(chunk: Chunk, check: InputCheck) -> Iterator[tuple[int, str, str, dict]]:
    """Yield ``(line, doc_id, text, row)`` for every valid document of ``chunk``; bad rows go to ``check``."""
    path = Path(chunk.path)
    if chunk.parquet:
        groups = None if chunk.end is None else list(range(chunk.start, chunk.end))
        rows = iter_parquet(path, check, groups, chunk.first)
    else:
        rows = iter_jsonl(path, check, chunk.start, chunk.end, chunk.first)
    for line, row in rows:
        if chunk.parquet and "_id" not in row and "doc_id" in row:
            row["_id"] = row["doc_id"]
        try:
            doc_id, text = _id(path, line, row), document_text(path, line, row)
        except DataError as e:
            check.reject(e, row)
            continue
        yield line, doc_id, text, row


# ------------------------------------------------------------------ plan (driver: metadata only)
def plan_chunks(paths: list[Path], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """The chunks of ``paths`` in input order, with exact first line numbers (cut JSONL files are
    aligned and their newlines counted in Ray tasks)."""
    import ray

    chunks: list[Chunk] = []
    cut: list[tuple[int, ray.ObjectRef]] = []  # (position in chunks, line-range task)
    line_range = ray.remote(num_cpus=STAGE_CPUS)(_line_range)
    for f, path in enumerate(paths):
        if path.suffix == ".parquet":
            chunks += _parquet_chunks(f, path, chunk_bytes)
            continue
        size = path.stat().st_size
        n = max(1, -(-size // chunk_bytes))
        if n == 1:
            chunks.append(Chunk(0, f, str(path)))
            continue
        for i in range(n):
            cut.append((len(chunks), line_range.remote(str(path), i * size // n, (i + 1) * size // n, i < n - 1)))
            chunks.append(Chunk(0, f, str(path)))
    ranges = dict(zip((k for k, _ in cut), ray.get([ref for _, ref in cut])))
    first, last_file = 1, -1
    for k, (start, end, newlines) in sorted(ranges.items()):
        if chunks[k].file != last_file:
            first, last_file = 1, chunks[k].file
        chunks[k] = replace(chunks[k], start=start, end=end, first=first)
        first += newlines
    kept = [c for c in chunks if c.end is None or c.end > c.start]  # a range inside one long line is empty
    return [replace(c, index=i) for i, c in enumerate(kept)]


def _parquet_chunks(f: int, path: Path, chunk_bytes: int) -> list[Chunk]:
    meta = pq.ParquetFile(path).metadata  # the footer only
    chunks, start, row, size = [], 0, 1, 0
    first = 1
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        row += meta.row_group(g).num_rows
        if size >= chunk_bytes or g == meta.num_row_groups - 1:
            chunks.append(Chunk(0, f, str(path), start, g + 1, first, parquet=True))
            start, first, size = g + 1, row, 0
    return chunks or [Chunk(0, f, str(path), parquet=True)]


def _line_start(fh, offset: int, limit: int | None = None) -> int | None:
    """The first line start at or after ``offset`` (the end of the file when none follows), read in
    blocks of SCAN_BYTES: a multi-GB line is never read whole. ``limit``: look only for one before
    ``limit`` (None when there is none)."""
    if offset == 0:
        return 0
    pos = offset - 1
    fh.seek(pos)
    while limit is None or pos < limit - 1:
        block = fh.read(SCAN_BYTES if limit is None else min(SCAN_BYTES, limit - 1 - pos))
        if not block:
            return pos if limit is None or pos < limit else None
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return None


def _line_range(path: str, start: int, end: int, count: bool) -> tuple[int, int, int]:
    """``(start, end)`` moved to line starts, and the newlines between them (when ``count``).

    A range in which no line starts (inside a long line) comes back empty without reading past
    ``end``: only the range where that line starts reads on to its end."""
    with open(path, "rb") as fh:
        a = _line_start(fh, start, end)
        if a is None:
            return end, end, 0
        b = _line_start(fh, end)
        newlines, left = 0, (b - a if count else 0)
        fh.seek(a)
        while left > 0 and (block := fh.read(min(1 << 24, left))):
            newlines += block.count(b"\n")
            left -= len(block)
    return a, b, newlines


# ------------------------------------------------------------------ phase 1: parse and partition
class _TaskCheck(InputCheck):
    """A task's bad-input policy: rejects are kept (for the driver's rejects file) instead of written."""

    def __init__(self, on_error: str, max_text_bytes: int, keep: bool):
        super().__init__(on_error, None, max_text_bytes)
        self.keep = keep
        self.entries: list[dict[str, Any]] = []

    def reject(self, err: DataError, raw: Any = None) -> None:
        super().reject(err, raw)  # raises with on_error=raise
        if self.keep:
            self.entries.append(reject_entry(err, raw))


def shard_name(bucket: int) -> str:
    return f"shard-{bucket:05d}.parquet"


def piece_name(bucket: int, chunk: int) -> str:
    return f"b{bucket:05d}-c{chunk:07d}.parquet"


def _error(file: int, err: DataError) -> dict[str, Any]:
    return {"pos": (file, err.line or 0), "path": err.path, "line": err.line, "reason": err.reason,
            "field": err.field}


def stage_chunk(chunk: Chunk, pieces: Location, num_shards: int, on_error: str, max_text_bytes: int,
                keep_rejects: bool) -> dict[str, Any]:
    """Phase 1 for one chunk: its valid rows written as one piece per bucket. Returns the buckets
    written (with row counts), per-file counts, kept rejects and the first error (on_error=raise)."""
    check = _TaskCheck(on_error, max_text_bytes, keep_rejects)
    cols: dict[int, tuple[list, list, list, list]] = {}
    error = None
    try:
        for line, doc_id, text, row in iter_chunk(chunk, check):
            ids, texts, lines, excerpts = cols.setdefault(id_hash(doc_id) % num_shards, ([], [], [], []))
            ids.append(doc_id)
            texts.append(text)
            lines.append(line)
            if keep_rejects:  # a duplicate found in phase 2 is reported with this row's excerpt
                excerpts.append(excerpt(row))
    except DataError as e:  # on_error=raise: the rows before it still count for earlier duplicates
        error = _error(chunk.file, e)
    for bucket, (ids, texts, lines, excerpts) in cols.items():
        table = {"doc_id": ids, "text": texts, "line": pa.array(lines, pa.int64())}
        if keep_rejects:
            table["excerpt"] = excerpts
        with pieces.open_atomic(piece_name(bucket, chunk.index)) as fh:
            pq.write_table(pa.table(table), fh)
    entries = [{**e, "pos": (chunk.file, e["line"])} for e in check.entries]
    return {"chunk": chunk.index, "pieces": {b: len(c[0]) for b, c in cols.items()}, "counts": check.counts,
            "rejects": entries, "error": error}


# ------------------------------------------------------------------ phase 2: one bucket -> one shard
class _Abort(Exception):
    """A duplicate under on_error=raise: the shard being written is dropped."""


def stage_bucket(bucket: int, pieces: Location, stage: Location, sources: list[tuple[int, int, str]],
                 on_error: str, keep_rejects: bool, limit: tuple[int, int] | None = None) -> dict[str, Any]:
    """Phase 2 for one bucket: ``sources`` are its pieces as ``(chunk, file, path)`` in input order.

    Writes ``shard-<bucket>.parquet`` (none when no row is accepted) and returns its count and ids
    digest, per-file counts, duplicate rejects and the first duplicate (on_error=raise). ``limit``:
    the earliest bad row phase 1 found: only the rows before it are checked, nothing is written.
    """
    name = shard_name(bucket)
    out: dict[str, Any] = {"bucket": bucket, "count": 0, "ids_digest": 0, "counts": {}, "rejects": [],
                           "error": None}
    try:
        if limit is not None:
            _dedupe(bucket, pieces, sources, on_error, keep_rejects, out, None, limit)
            return out
        with stage.open_atomic(name) as fh:
            writer = pq.ParquetWriter(fh, SCHEMA)
            try:
                _dedupe(bucket, pieces, sources, on_error, keep_rejects, out, writer, None)
            finally:
                writer.close()
    except _Abort:
        pass
    if out["count"] == 0:
        stage.delete(name)
    out["ids_digest"] = f"{out['ids_digest'] & ((1 << 64) - 1):016x}"
    return out


def _dedupe(bucket: int, pieces: Location, sources: list[tuple[int, int, str]], on_error: str, keep_rejects: bool,
            out: dict[str, Any], writer: pq.ParquetWriter | None, limit: tuple[int, int] | None) -> None:
    seen: dict[str, tuple[str, int]] = {}  # this bucket's ids only: a 1/num_shards part of the corpus
    buffer: tuple[list[str], list[str]] = ([], [])
    columns = ["doc_id", "line"] + (["text"] if writer else []) + (["excerpt"] if keep_rejects else [])
    for chunk, file, path in sources:
        table = pq.read_table(pieces.open_input(piece_name(bucket, chunk)), columns=columns).to_pydict()
        counts = out["counts"].setdefault(path, {"accepted": 0, "rejected": 0})
        for j, (doc_id, line) in enumerate(zip(table["doc_id"], table["line"])):
            if limit is not None and (file, line) >= limit:
                return
            if doc_id in seen:
                first_path, first_line = seen[doc_id]
                err = DataError(path, line, f"duplicate id {doc_id!r}, first at {first_path}:{first_line}",
                                field="_id")
                if on_error == "raise":
                    out["error"] = _error(file, err)
                    raise _Abort()
                counts["rejected"] += 1
                if keep_rejects:
                    out["rejects"].append({**reject_entry(err, table["excerpt"][j]), "pos": (file, line)})
                continue
            seen[doc_id] = (path, line)
            counts["accepted"] += 1
            if writer:
                buffer[0].append(doc_id)
                buffer[1].append(table["text"][j])
                if len(buffer[0]) >= FLUSH:
                    _flush(bucket, buffer, writer, out)
    if writer:
        _flush(bucket, buffer, writer, out)


def _flush(bucket: int, buffer: tuple[list[str], list[str]], writer: pq.ParquetWriter, out: dict[str, Any]) -> None:
    ids, texts = buffer
    if not ids:
        return
    # Length-sorted runs: encode batches then hold similar lengths, so each forward pads little
    # (ids travel with their rows, order inside a shard is free).
    order = sorted(range(len(ids)), key=lambda j: len(texts[j]))
    writer.write_table(pa.table({"doc_id": [ids[j] for j in order], "text": [texts[j] for j in order],
                                 "shard": pa.array([bucket] * len(ids), pa.int32())}, schema=SCHEMA))
    out["count"] += len(ids)
    out["ids_digest"] += sum(id_hash(d) for d in ids)
    ids.clear()
    texts.clear()


# ------------------------------------------------------------------ driver: metadata only
def cancel_and_wait(refs: list, wait_s: float = CANCEL_WAIT_S) -> None:
    """Cancel the tasks of ``refs`` and return once none runs: interrupted first (their atomic
    writes then remove their temporary files), killed if they have not stopped after ``wait_s``."""
    import ray

    if not refs:
        return
    for force in (False, True):
        for ref in refs:
            try:
                ray.cancel(ref, force=force)
            except Exception:  # noqa: BLE001 - a finished or unknown task: nothing to stop
                pass
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=wait_s if not force else None,
                              fetch_local=False)
        if not pending:
            return


def _warn_stale_pieces(stage: Location) -> None:
    """Say which ``pieces-*`` folders an earlier run left (killed, or one staging now: not removed)."""
    try:
        infos = stage.fs.get_file_info(pafs.FileSelector(stage.base, allow_not_found=True))
    except OSError:
        return
    stale = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(PIECES))
    if stale:
        print(f"[stage] {stage.uri} holds {', '.join(stale)}: pieces of a staging that was killed (or runs now); "
              "remove them by hand once no staging runs there", file=sys.stderr, flush=True)


def run_staging(paths: list[Path], stage: Location, num_shards: int, check: InputCheck,
                chunk_bytes: int = CHUNK_BYTES) -> list[dict[str, Any]]:
    """Stage ``paths`` into ``stage`` on Ray (see the module doc); counts and rejects go to ``check``.

    Returns one ``{"bucket", "count", "ids_digest"}`` per written shard, in bucket order. Raises the
    earliest bad row in input order under ``on_error=raise``.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("corpus staging runs in Ray tasks: start or join a cluster first "
                           "(distributed_ir.train.launch.init_ray or ray.init)")
    _warn_stale_pieces(stage)
    name = f"{PIECES}-{uuid.uuid4().hex[:16]}"  # this run's own: a concurrent run's is left alone
    pieces = stage.child(name)
    keep = check.on_error == "skip" and check.rejects_path is not None
    refs: list[ray.ObjectRef] = []  # the tasks in flight
    buckets: list[int] = []  # phase 2's, once started
    try:
        chunks = plan_chunks(paths, chunk_bytes)
        parse = ray.remote(num_cpus=STAGE_CPUS)(stage_chunk)
        refs = [parse.remote(c, pieces, num_shards, check.on_error, check.max_text_bytes, keep) for c in chunks]
        parsed = ray.get(refs)
        errors = [r["error"] for r in parsed if r["error"]]
        limit = min((e["pos"] for e in errors), default=None)
        sources: dict[int, list[tuple[int, int, str]]] = {}
        for c, r in zip(chunks, parsed):
            for bucket in r["pieces"]:
                sources.setdefault(bucket, []).append((c.index, c.file, c.path))
        dedupe = ray.remote(num_cpus=STAGE_CPUS)(stage_bucket)
        buckets = sorted(sources)
        refs = [dedupe.remote(b, pieces, stage, sources[b], check.on_error, keep, limit) for b in buckets]
        shards = ray.get(refs)
    except BaseException:
        # a task failed (not bad input: that comes back as a result) or the driver was interrupted:
        # the others must not write pieces or shards after the cleanup below
        cancel_and_wait(refs)
        for b in buckets:  # no partial staging is left behind
            stage.delete(shard_name(b))
        raise
    finally:
        stage.delete_folder(name)
    errors += [s["error"] for s in shards if s["error"]]
    if errors:
        for s in shards:  # no partial staging is left behind
            stage.delete(shard_name(s["bucket"]))
        first = min(errors, key=lambda e: e["pos"])
        raise DataError(first["path"], first["line"], first["reason"], field=first["field"])
    for result in parsed + shards:
        for path, counts in result["counts"].items():
            check.add(path, counts)
    for entry in sorted((e for r in parsed + shards for e in r["rejects"]), key=lambda e: e["pos"]):
        check.write_reject({k: v for k, v in entry.items() if k != "pos"})
    return [{k: s[k] for k in ("bucket", "count", "ids_digest")} for s in shards if s["count"]]
