"""Corpus staging: validate every document once and split the corpus into Parquet shards.

Input: BEIR-style JSONL (``_id``, ``title``, ``text``) or Parquet (``_id``/``doc_id``, ``title``,
``text``), many files or a glob. Each document is checked (id present, non-empty, unique across
all files; text a non-empty string, at most ``max_text_bytes``) and bad input stops with
FILE:LINE and field, or with ``on_error=skip`` goes to the rejects file; a duplicate names both
places. A document goes to shard ``blake2b(id) % num_shards``; inside a shard, runs of up to FLUSH
rows are sorted by length (cheap length-aware batching downstream). The work runs in Ray tasks
(:mod:`distributed_ir.index.staging`): the driver reads no document and holds no id set. Shards are
written atomically and described in ``stage.json`` with counts, so a rerun on the same corpus
reuses them.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import MAX_TEXT_BYTES, InputCheck
from distributed_ir.index.staging import CHUNK_BYTES, Chunk, id_hash, iter_chunk, run_staging, shard_name
from distributed_ir.index.storage import Location, inside

__all__ = ["StagedShard", "expand_corpus", "ids_digest", "inside", "iter_documents", "stage_corpus"]

STAGE_FILE = "stage.json"


@dataclass
class StagedShard:
    """One staged shard: ``file`` inside the stage location, ``count`` documents whose ids hash
    to ``ids_digest`` (see :func:`ids_digest`)."""

    index: int
    file: str
    count: int
    ids_digest: str = ""


_MASK = (1 << 64) - 1


def ids_digest(ids: Iterable[str]) -> str:
    """Order-independent digest of a multiset of ids: the sum of their 64-bit hashes mod 2**64.

    With the count it proves a shard written by a worker holds exactly its staged ids, without
    anyone collecting the ids (or vectors) in one place.
    """
    return f"{sum(id_hash(doc_id) for doc_id in ids) & _MASK:016x}"


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
    """Yield ``(file, line, doc_id, text, row)`` for every valid document; bad rows go to ``check``.

    In one process, file after file (staging reads the same way, in parallel Ray tasks)."""
    for f, path in enumerate(paths):
        for line, doc_id, text, row in iter_chunk(Chunk(0, f, str(path), parquet=path.suffix == ".parquet"), check):
            yield path, line, doc_id, text, row


def corpus_fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def stage_corpus(paths: list[Path], stage_dir: Path | str | Location, num_shards: int,
                 check: InputCheck | None = None, chunk_bytes: int = CHUNK_BYTES) -> tuple[list[StagedShard], str]:
    """Validate and shard the corpus into ``stage_dir`` (a folder or URI); reuse an identical earlier staging.

    Returns the shards and a stage id (corpus fingerprint + shard count + bad-input policy):
    embeddings made for another stage id must not be reused. Empty shards are dropped (fewer
    docs than shards). With ``check.on_error == "skip"`` bad documents go to the rejects file;
    a reused staging restores the counts it recorded into ``check``. Staging runs in Ray tasks
    (``chunk_bytes`` of input each): Ray must be initialised (a reused staging needs no Ray).
    """
    check = check or InputCheck()
    stage = stage_dir if isinstance(stage_dir, Location) else Location(stage_dir)
    stage.mkdir()
    fingerprint = corpus_fingerprint(paths)
    stage_id = f"{fingerprint}-{num_shards}"
    if check.on_error != "raise" or check.max_text_bytes != MAX_TEXT_BYTES:
        stage_id += f"-{check.on_error}-{check.max_text_bytes}"  # another policy stages other rows
    reused = _reuse_stage(stage, stage_id, check)
    if reused is not None:
        return reused, stage_id
    for old in stage.list():
        if old.startswith("shard-") or old == STAGE_FILE:  # a failed staging leaves no stale description
            stage.delete(old)
    written = run_staging(paths, stage, num_shards, check, chunk_bytes)
    shards = [StagedShard(s["bucket"], shard_name(s["bucket"]), s["count"], s["ids_digest"])
              for s in written]
    meta = {"stage_id": stage_id, "fingerprint": fingerprint, "num_shards": num_shards,
            "num_docs": sum(s.count for s in shards),
            "input": {str(p): check.counts.get(str(p), {}) for p in paths},
            "files": [str(p) for p in paths],
            "shards": [{"index": s.index, "file": s.file, "count": s.count, "ids_digest": s.ids_digest}
                       for s in shards]}
    stage.write_json(STAGE_FILE, meta)
    return shards, stage_id


def _reuse_stage(stage: Location, stage_id: str, check: InputCheck) -> list[StagedShard] | None:
    """The shards of an earlier staging with the same ``stage_id`` (its input counts restored into
    ``check``), or None when there is none to reuse."""
    if not stage.is_file(STAGE_FILE):
        return None
    meta = stage.read_json(STAGE_FILE)
    # a stage.json without id digests cannot prove a shard's ids: stage again (same corpus, same shards)
    if meta.get("stage_id") != stage_id or not all("ids_digest" in s for s in meta["shards"]):
        return None
    for name, counts in meta.get("input", {}).items():
        check.counts[name] = dict(counts)
    for s in meta["shards"]:
        stage.path(s["file"])  # a crafted stage.json must not point outside the folder
    return [StagedShard(s["index"], s["file"], s["count"], s["ids_digest"]) for s in meta["shards"]]
