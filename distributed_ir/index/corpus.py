"""Corpus staging: validate every document once and split the corpus into Parquet shards.

Input: BEIR-style JSONL (``_id``, ``title``, ``text``) or Parquet (``_id``/``doc_id``, ``title``,
``text``), many files or a glob. Each document is checked (id present, non-empty, unique across
all files; text a non-empty string, at most ``max_text_bytes``) and bad input stops with
FILE:LINE and field, or with ``on_error=skip`` goes to the rejects file; a duplicate names both
places. Document k (in reading order) goes to shard ``k % num_shards``; inside a shard, runs of
up to FLUSH rows are sorted by length (cheap length-aware batching downstream). Shards are written
atomically and described in ``stage.json`` with counts, so a rerun on the same corpus reuses them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ir.data.beir import _id, document_text
from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import MAX_TEXT_BYTES, InputCheck, iter_jsonl, iter_parquet

STAGE_FILE = "stage.json"
FLUSH = 8192


@dataclass
class StagedShard:
    index: int
    path: Path
    count: int


def expand_corpus(spec: str | list[str]) -> list[Path]:
    """Paths from a file, a folder (its *.jsonl / *.parquet), a glob, or a list of those."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl")) + sorted(p.glob("*.parquet"))
        elif any(c in s for c in "*?["):
            found = [Path(x) for x in sorted(glob.glob(s))]
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise DataError(s, None, "no corpus files found (expected .jsonl or .parquet)")
        paths.extend(found)
    return paths


def iter_documents(paths: list[Path], check: InputCheck) -> Iterator[tuple[Path, int, str, str, dict]]:
    """Yield ``(file, line, doc_id, text, row)`` for every valid document; bad rows go to ``check``."""
    for path in paths:
        rows = iter_parquet(path, check) if path.suffix == ".parquet" else iter_jsonl(path, check)
        for line, row in rows:
            if path.suffix == ".parquet" and "_id" not in row and "doc_id" in row:
                row["_id"] = row["doc_id"]
            try:
                doc_id, text = _id(path, line, row), document_text(path, line, row)
            except DataError as e:
                check.reject(e, row)
                continue
            yield path, line, doc_id, text, row


def inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and ``..`` that leave ``root`` (a manifest
    is data: a crafted one must not make us read or overwrite files elsewhere)."""
    rel = Path(relative)
    path = (root / rel).resolve()
    if rel.is_absolute() or not path.is_relative_to(root.resolve()):
        raise ValueError(f"path {relative!r} escapes {root}")
    return path


def corpus_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def stage_corpus(paths: list[Path], stage_dir: Path, num_shards: int,
                 check: InputCheck | None = None) -> tuple[list[StagedShard], str]:
    """Validate and shard the corpus into ``stage_dir``; reuse an identical earlier staging.

    Returns the shards and a stage id (corpus fingerprint + shard count + bad-input policy):
    embeddings made for another stage id must not be reused. Empty shards are dropped (fewer
    docs than shards). With ``check.on_error == "skip"`` bad documents go to the rejects file;
    a reused staging restores the counts it recorded into ``check``.
    """
    check = check or InputCheck()
    stage_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = corpus_fingerprint(paths)
    stage_id = f"{fingerprint}-{num_shards}"
    if check.on_error != "raise" or check.max_text_bytes != MAX_TEXT_BYTES:
        stage_id += f"-{check.on_error}-{check.max_text_bytes}"  # another policy stages other rows
    meta_file = stage_dir / STAGE_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("stage_id") == stage_id:
            for name, counts in meta.get("input", {}).items():
                check.counts[name] = dict(counts)
            return [StagedShard(s["index"], inside(stage_dir, s["file"]), s["count"]) for s in meta["shards"]], stage_id
    for old in stage_dir.glob("shard-*.parquet"):
        old.unlink()
    # Streams: at most FLUSH rows per shard are buffered; only the ids (for the duplicate
    # check) are held for the whole corpus.
    schema = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("shard", pa.int32())])
    names = [f"shard-{i:05d}.parquet" for i in range(num_shards)]
    writers = [pq.ParquetWriter(stage_dir / (n + ".tmp"), schema) for n in names]
    buffers: list[tuple[list[str], list[str]]] = [([], []) for _ in range(num_shards)]
    counts = [0] * num_shards
    seen: dict[str, tuple[Path, int]] = {}

    def flush(i: int) -> None:
        ids, texts = buffers[i]
        if ids:
            # Length-sorted runs: Ray Data blocks then hold similar lengths, so each encode
            # batch pads little (ids travel with their rows, order inside a shard is free).
            order = sorted(range(len(ids)), key=lambda j: len(texts[j]))
            ids, texts = [ids[j] for j in order], [texts[j] for j in order]
            writers[i].write_table(pa.table({"doc_id": ids, "text": texts, "shard": pa.array([i] * len(ids), pa.int32())},
                                            schema=schema))
            buffers[i] = ([], [])

    try:
        k = 0
        for path, line, doc_id, text, row in iter_documents(paths, check):
            if doc_id in seen:
                first_path, first_line = seen[doc_id]
                check.reject(DataError(path, line, f"duplicate id {doc_id!r}, first at {first_path}:{first_line}",
                                       field="_id"), row)
                continue
            check.accept(path)
            seen[doc_id] = (path, line)
            i = k % num_shards
            k += 1
            buffers[i][0].append(doc_id)
            buffers[i][1].append(text)
            counts[i] += 1
            if len(buffers[i][0]) >= FLUSH:
                flush(i)
        for i in range(num_shards):
            flush(i)
    finally:
        for w in writers:
            w.close()
    shards = []
    for i, name in enumerate(names):
        if counts[i] == 0:
            (stage_dir / (name + ".tmp")).unlink()
            continue
        os.replace(stage_dir / (name + ".tmp"), stage_dir / name)
        shards.append(StagedShard(i, stage_dir / name, counts[i]))
    meta = {"stage_id": stage_id, "fingerprint": fingerprint, "num_shards": num_shards, "num_docs": len(seen),
            "input": {str(p): check.counts.get(str(p), {}) for p in paths},
            "files": [str(p) for p in paths],
            "shards": [{"index": s.index, "file": s.path.name, "count": s.count} for s in shards]}
    tmp = meta_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_file)
    return shards, stage_id
