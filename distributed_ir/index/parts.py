"""Index shards ("parts") built in Ray tasks from embedding shard files, and searched one at a time.

Layout of ``<out>/index/`` (written by ``distributed-ir index``)::

    index.json                      factory, dim, ntotal, model, parts: [{file, ids, offset, ntotal, ...}]
    index-00000-<build>.faiss       part 0: external ids = corpus positions offset .. offset+ntotal-1
    ids-00000-<build>.parquet       part 0: doc_id of each of those positions, in order

No process holds all vectors: a part's task reads its embedding shards row group by row group;
an IVF/PQ quantizer is trained once, on a sample drawn shard by shard, and shared by every part;
search loads one part at a time and merges top-k with the project's ranking rule (score
descending, doc id descending for ties, :func:`distributed_ir.eval.metrics.rank`). The older
layout (``index-*.faiss`` + one ``doc_ids.json``) is still read.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ir.index.faiss_index import (
    IDS_FILE,
    ShardedIndex,
    _gpu_ok,
    check_trainable,
    new_index,
    set_search_params,
)
from distributed_ir.index.shards import iter_shard, node_identity
from distributed_ir.index.storage import Location

INDEX_JSON = "index.json"


def _write_index(folder: Location, name: str, index) -> None:
    import faiss

    if folder.local:  # straight to disk: no second in-memory copy of a big index
        final = folder.local_path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:12]}")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, final)
    else:
        folder.write_bytes(name, faiss.serialize_index(index).tobytes())


def _read_index(folder: Location, name: str):
    import faiss

    if folder.local:
        return faiss.read_index(str(folder.local_path(name)))
    return faiss.deserialize_index(np.frombuffer(folder.read_bytes(name), dtype=np.uint8))


def train_quantizer(out: Location, entries: list[dict], factory: str, dim: int, train_size: int = 100_000,
                    seed: int = 0, use_gpu: bool = False) -> bytes:
    """An empty, trained index (IVF centroids, PQ codebooks) from ``train_size`` vectors sampled
    uniformly, each shard contributing its share; returns it serialized."""
    import faiss

    total = sum(e["count"] for e in entries)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(total, size=min(train_size, total), replace=False))
    sample, start = [], 0
    for entry in entries:
        for _, vecs in iter_shard(out, entry):
            lo, hi = np.searchsorted(picked, [start, start + len(vecs)])
            sample.append(vecs[picked[lo:hi] - start])
            start += len(vecs)
    index = new_index(dim, factory)
    on_gpu = _gpu_ok(factory, use_gpu)
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.train(np.ascontiguousarray(np.concatenate(sample), dtype=np.float32))
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index).tobytes()


def build_part(out: Location, entries: list[dict], offset: int, factory: str, dim: int, trained: bytes | None,
               use_gpu: bool, part: int, build: str, hnsw_ef_search: int = 128, nprobe: int = 16) -> dict[str, Any]:
    """Index the embedding shards ``entries`` (corpus positions from ``offset``) into one part file."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8)) if trained is not None else new_index(dim, factory)
    on_gpu = _gpu_ok(factory, use_gpu)
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    folder = out.child("index")
    ids_name, pos = f"ids-{part:05d}-{build}.parquet", offset
    with folder.open_atomic(ids_name) as sink, pq.ParquetWriter(sink, pa.schema([("doc_id", pa.string())])) as writer:
        for entry in entries:
            for ids, vecs in iter_shard(out, entry):
                index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.arange(pos, pos + len(ids), dtype=np.int64))
                writer.write_table(pa.table({"doc_id": pa.array(ids, pa.string())}))
                pos += len(ids)
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    set_search_params(index, hnsw_ef_search=hnsw_ef_search, nprobe=nprobe)
    name = f"index-{part:05d}-{build}.faiss"
    _write_index(folder, name, index)
    return {"file": name, "ids": ids_name, "offset": offset, "ntotal": int(index.ntotal),
            "bytes": folder.size(name), **node_identity()}


def build_parts(out: Location, entries: list[dict], factory: str, dim: int, num_parts: int = 1,
                use_gpu: bool = False, train_size: int = 100_000, extra: dict | None = None,
                remote: bool = True) -> dict[str, Any]:
    """Build ``num_parts`` parts (consecutive groups of embedding shards) in Ray tasks (in this
    process with ``remote=False``); write ``index/index.json`` last (it names the parts, so a crash
    mid-build leaves the old index readable) and delete files no longer named. Returns its content."""
    total = sum(e["count"] for e in entries)
    check_trainable(factory, dim, total)
    groups = [g for g in np.array_split(np.arange(len(entries)), max(1, min(num_parts, len(entries)))) if len(g)]
    starts = np.concatenate([[0], np.cumsum([e["count"] for e in entries])])
    train, part = train_quantizer, build_part
    if remote:
        import ray

        # 0.5 CPU: fits beside a finishing encode pool on a small node; FAISS runs its own threads
        gpu = {"num_gpus": 1} if use_gpu and ray.cluster_resources().get("GPU", 0) >= 1 else {}
        train, part = (ray.remote(num_cpus=0.5, **gpu)(f).remote for f in (train_quantizer, build_part))
    trained = None
    if not new_index(dim, factory).is_trained:
        trained = train(out, entries, factory, dim, train_size, 0, use_gpu)  # an ObjectRef: never fetched here
    build = uuid.uuid4().hex[:8]
    parts = [part(out, [entries[i] for i in g], int(starts[g[0]]), factory, dim, trained, use_gpu, j, build)
             for j, g in enumerate(groups)]
    if remote:
        parts = ray.get(parts)
    meta = {"layout": 2, "factory": factory, "dim": dim, "ntotal": sum(p["ntotal"] for p in parts),
            "shards": len(parts), "parts": parts, **(extra or {})}
    folder = out.child("index")
    folder.write_json(INDEX_JSON, meta)
    keep = {INDEX_JSON} | {p["file"] for p in parts} | {p["ids"] for p in parts}
    for name in folder.list():
        if name not in keep:
            folder.delete(name)
    return meta


def iter_parts(folder: Path | str | Location) -> Iterator[tuple[Any, list[str], int]]:
    """``(faiss index, doc ids, offset)`` per part, one loaded at a time. Offset -1: the legacy
    layout, whose ``doc_ids`` is the one global list every index file's positions index into."""
    loc = folder if isinstance(folder, Location) else Location(folder)
    meta = loc.read_json(INDEX_JSON) if loc.is_file(INDEX_JSON) else {}
    if "parts" in meta:
        for p in meta["parts"]:
            with loc.open_input(p["ids"]) as fh:
                ids = pq.read_table(fh).column("doc_id").to_pylist()
            yield _read_index(loc, p["file"]), ids, int(p["offset"])
        return
    files = [n for n in loc.list() if n.startswith("index-") and n.endswith(".faiss")]
    if not files:
        raise FileNotFoundError(f"{loc.uri}: no index files (build one with `distributed-ir index`)")
    doc_ids = loc.read_json(IDS_FILE)
    for name in files:
        yield _read_index(loc, name), doc_ids, -1


def load_sharded(folder: Path | str | Location) -> ShardedIndex:
    """Every index part in memory at once (the LangChain retriever, tests); ``search`` and the
    pipeline stream them with :func:`search_parts` / :func:`search_loaded`."""
    indexes, doc_ids = [], []
    for index, ids, offset in iter_parts(folder):
        if offset != len(doc_ids) and offset >= 0:
            raise ValueError(f"{folder}: index parts are not contiguous ({offset} != {len(doc_ids)})")
        indexes.append(index)
        if offset >= 0:
            doc_ids += ids
        else:
            doc_ids = ids  # legacy layout: one global id list for every index file
    return ShardedIndex(indexes, doc_ids)


def merge_ranked(scores: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns per row by score descending, ties by doc id descending (the ranking rule).

    ``docs`` is an object array (None where a part had fewer hits; their scores are -inf).
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    top_s = np.take_along_axis(scores, order, 1)
    top_d = np.take_along_axis(docs, order, 1)
    if top_s.shape[1] > k:  # a tie across the cut: which tied docs stay is the rule's choice, not FAISS's
        for r in np.nonzero(np.isfinite(top_s[:, k - 1]) & (top_s[:, k - 1] == top_s[:, k]))[0]:
            pairs = sorted(((s, d) for s, d in zip(top_s[r], top_d[r]) if d is not None), reverse=True)
            pairs += [(-np.inf, None)] * (len(top_s[r]) - len(pairs))
            top_s[r] = [s for s, _ in pairs]
            top_d[r] = np.array([d for _, d in pairs], dtype=object)
    return top_s[:, :k], top_d[:, :k]


def search_parts(folder: Path | str | Location, queries: np.ndarray, k: int) -> list[dict[str, float]]:
    """``{doc_id: score}`` of the top ``k`` per query over every part (one part in memory at a time)."""
    return search_loaded(iter_parts(folder), queries, k)


def search_loaded(parts: Iterable[tuple[Any, list[str], int]], queries: np.ndarray, k: int) -> list[dict[str, float]]:
    """The project's one searcher: ``{doc_id: score}`` of the top ``k`` per query over ``parts``
    (``(faiss index, doc ids, offset)`` as :func:`iter_parts` yields them: streamed by the ``search``
    command, held by a search actor), merged by the ranking rule (:func:`merge_ranked`)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.zeros((len(queries), 0), np.float32)
    best_d = np.zeros((len(queries), 0), object)
    for index, ids, offset in parts:
        kk = min(k, index.ntotal)
        if kk == 0:
            continue
        scores, positions = index.search(queries, kk)
        lookup = np.asarray(ids, dtype=object)
        local = np.clip(positions - max(offset, 0), 0, len(lookup) - 1)
        docs = np.where(positions >= 0, lookup[local], None)
        scores = np.where(positions >= 0, scores, -np.inf).astype(np.float32)
        best_s, best_d = merge_ranked(np.concatenate([best_s, scores], 1), np.concatenate([best_d, docs], 1), k)
        del index
    return [{d: float(s) for s, d in zip(srow, drow) if d is not None} for srow, drow in zip(best_s, best_d)]
