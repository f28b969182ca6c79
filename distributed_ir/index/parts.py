"""Index shards ("parts") built in Ray tasks from embedding shard files, and searched part by part.

Layout of ``<out>/index/`` (written by ``distributed-ir index``)::

    index.json                      factory, dim, ntotal, model, parts: [{file, ids, offset, ntotal, ...}]
    index-00000-<build>.faiss       part 0: external ids = corpus positions offset .. offset+ntotal-1
    ids-00000-<build>.parquet       part 0: doc_id of each of those positions, in order

No process holds all vectors: a part's task reads its embedding shards row group by row group;
an IVF/PQ quantizer is trained once, on a sample drawn shard by shard, and shared by every part;
search streams the parts (:func:`search_parts`) or holds a group of them (:class:`PartSearcher`,
one per searcher actor) and merges top-k with the project's ranking rule (score descending, doc
id descending for ties, :func:`distributed_ir.eval.metrics.rank`). The older layout
(``index-*.faiss`` + one ``doc_ids.json``) is still read.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_ir.index.faiss_index import (
    IDS_FILE,
    ShardedIndex,
    _gpu_ok,
    _is_hnsw,
    check_trainable,
    gpu_count,
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
                remote: bool = True, start_timeout_s: float = 600) -> dict[str, Any]:
    """Build ``num_parts`` parts (consecutive groups of embedding shards) in Ray tasks (in this
    process with ``remote=False``); write ``index/index.json`` last (it names the parts, so a crash
    mid-build leaves the old index readable) and delete files no longer named. Returns its content.

    ``use_gpu``: each task asks for a GPU (GPU FAISS where the task's FAISS sees one); a cluster
    without a GPU yet is waited for up to ``start_timeout_s`` (an autoscaler may add one), then
    :class:`~distributed_ir.index.actors.ActorStartTimeout` names the request."""
    total = sum(e["count"] for e in entries)
    check_trainable(factory, dim, total)
    groups = [g for g in np.array_split(np.arange(len(entries)), max(1, min(num_parts, len(entries)))) if len(g)]
    starts = np.concatenate([[0], np.cumsum([e["count"] for e in entries])])
    train, part = train_quantizer, build_part
    # 0.5 CPU: fits beside a finishing encode pool on a small node; FAISS runs its own threads
    request = {"CPU": 0.5, **({"GPU": 1} if use_gpu else {})}
    if remote:
        import ray

        options = {"num_cpus": request["CPU"], "num_gpus": request.get("GPU", 0)}
        train, part = (ray.remote(**options)(f).remote for f in (train_quantizer, build_part))
    trained = None
    if not new_index(dim, factory).is_trained:
        trained = train(out, entries, factory, dim, train_size, 0, use_gpu)  # an ObjectRef: never fetched here
    build = uuid.uuid4().hex[:8]
    parts = [part(out, [entries[i] for i in g], int(starts[g[0]]), factory, dim, trained, use_gpu, j, build)
             for j, g in enumerate(groups)]
    if remote:
        from distributed_ir.index.actors import wait_for_resources

        wait_for_resources(request, parts if trained is None else [trained, *parts], start_timeout_s, "index build")
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


def _part_table(loc: Location) -> list[dict[str, Any]]:
    """One entry per part: ``{file, ids, offset, bytes, ...}`` (layout 2), or ``{file, offset: -1}``
    per index file of the legacy layout (whose ids are the one global ``doc_ids.json``)."""
    meta = loc.read_json(INDEX_JSON) if loc.is_file(INDEX_JSON) else {}
    if "parts" in meta:
        return meta["parts"]
    files = [n for n in loc.list() if n.startswith("index-") and n.endswith(".faiss")]
    if not files:
        raise FileNotFoundError(f"{loc.uri}: no index files (build one with `distributed-ir index`)")
    return [{"file": n, "offset": -1} for n in files]


def part_sizes(folder: Path | str | Location) -> list[int]:
    """Bytes of each part's FAISS file, in part order (what a process holding it needs in memory)."""
    loc = folder if isinstance(folder, Location) else Location(folder)
    return [int(p["bytes"]) if "bytes" in p else loc.size(p["file"]) for p in _part_table(loc)]


def part_groups(num_parts: int, searchers: int = 0) -> list[list[int]]:
    """Parts ``0..num_parts-1`` as ``searchers`` groups of consecutive parts (0: one part per group)."""
    if searchers < 0:
        raise ValueError(f"searchers must be >= 0, got {searchers}")
    count = min(searchers or num_parts, num_parts)
    return [g.tolist() for g in np.array_split(np.arange(num_parts), max(1, count)) if len(g)]


def iter_parts(folder: Path | str | Location, which: Collection[int] | None = None
               ) -> Iterator[tuple[Any, list[str], int]]:
    """``(faiss index, doc ids, offset)`` per part (the parts numbered ``which``; all when None), one
    loaded at a time. Offset -1: the legacy layout, whose ``doc_ids`` is the one global list every
    index file's positions index into."""
    loc = folder if isinstance(folder, Location) else Location(folder)
    table = _part_table(loc)
    doc_ids = None
    for j, p in enumerate(table):
        if which is not None and j not in which:
            continue
        if p["offset"] >= 0:
            with loc.open_input(p["ids"]) as fh:
                ids = pq.read_table(fh).column("doc_id").to_pylist()
        else:
            ids = doc_ids = doc_ids if doc_ids is not None else loc.read_json(IDS_FILE)
        yield _read_index(loc, p["file"]), ids, int(p["offset"])


def load_sharded(folder: Path | str | Location) -> ShardedIndex:
    """Every index part in memory at once as a :class:`ShardedIndex` (tests compare it with the
    parts); searching goes through :func:`search_hits` (:class:`PartSearcher`, :func:`search_parts`)."""
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


Hits = tuple[np.ndarray, np.ndarray]  # (scores float32 [n, <=k], doc ids object [n, <=k]; None: no hit)


def search_parts(folder: Path | str | Location, queries: np.ndarray, k: int) -> list[dict[str, float]]:
    """``{doc_id: score}`` of the top ``k`` per query over every part (one part in memory at a time)."""
    return search_loaded(iter_parts(folder), queries, k)


def search_loaded(parts: Iterable[tuple[Any, list[str], int]], queries: np.ndarray, k: int) -> list[dict[str, float]]:
    """``{doc_id: score}`` of the top ``k`` per query over ``parts`` (:func:`search_hits` as dicts)."""
    return hit_dicts(search_hits(parts, queries, k))


def search_hits(parts: Iterable[tuple[Any, list[str], int]], queries: np.ndarray, k: int) -> Hits:
    """The project's one searcher: the top ``k`` per query over ``parts`` (``(faiss index, doc ids,
    offset)`` as :func:`iter_parts` yields them: streamed by :func:`search_parts`, held by a
    :class:`PartSearcher`), each part's hits merged into the running top ``k`` by :func:`merge_ranked`.

    The top ``k`` under a total order (score, then doc id) of a union is the top ``k`` of the
    per-group top ``k`` lists, so searchers holding disjoint groups of parts, merged by
    :func:`merge_hits`, return exactly what one process holding every part returns."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.zeros((len(queries), 0), np.float32)
    best_d = np.zeros((len(queries), 0), object)
    for index, ids, offset in parts:
        if index.ntotal == 0:
            continue
        scores, positions = _search_part(index, queries, k)
        lookup = np.asarray(ids, dtype=object)
        local = np.clip(positions - max(offset, 0), 0, len(lookup) - 1)
        docs = np.where(positions >= 0, lookup[local], None)
        scores = np.where(positions >= 0, scores, -np.inf).astype(np.float32)
        best_s, best_d = merge_ranked(np.concatenate([best_s, scores], 1), np.concatenate([best_d, docs], 1), k)
        del index
    return best_s, best_d


def _search_part(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's top ``k`` of one part and every hit tied with a row's ``k``-th score: FAISS cuts a tie
    by position, the ranking rule by doc id, so all of it must reach :func:`merge_ranked`. Widened
    (the whole batch again, so every row's scores come from one call) until no row's last hit ties."""
    n = int(index.ntotal)
    kk = min(k + 1, n)
    while True:
        scores, positions = index.search(queries, kk)
        if kk >= n or not np.any((positions[:, -1] >= 0) & (scores[:, -1] == scores[:, k - 1])):
            return scores, positions
        kk = min(2 * kk, n)


def merge_hits(results: list[Hits], k: int) -> Hits:
    """The top ``k`` per query over several searchers' top-``k`` hits (same queries, same order)."""
    return merge_ranked(np.concatenate([s for s, _ in results], 1), np.concatenate([d for _, d in results], 1), k)


def hit_dicts(hits: Hits) -> list[dict[str, float]]:
    """``{doc_id: score}`` per query (rank them with :func:`distributed_ir.eval.metrics.rank`)."""
    return [{d: float(s) for s, d in zip(srow, drow) if d is not None} for srow, drow in zip(*hits)]


def _on_device(index, use_gpu: bool):
    """``index`` on this process's GPUs when asked and FAISS sees one here (HNSW has no GPU form)."""
    if not (use_gpu and gpu_count() > 0 and not _is_hnsw(index)):
        return index
    import faiss

    return faiss.index_cpu_to_all_gpus(index)


class PartSearcher:
    """Parts ``which`` of an index folder (every part when None) held in memory and searched by
    :func:`search_hits`: in this process (``IndexRetriever``), inside a query actor, or as one
    per-part searcher actor (:mod:`distributed_ir.index.searchers`). No Ray imports.

    GPU FAISS when ``use_gpu`` and FAISS in *this* process sees a GPU (``faiss-gpu`` installed, a
    device visible to the actor); CPU FAISS otherwise.
    """

    def __init__(self, folder: Path | str | Location, which: Collection[int] | None = None, use_gpu: bool = False):
        self.parts = [(_on_device(index, use_gpu), ids, offset) for index, ids, offset in iter_parts(folder, which)]
        self.which = sorted(which) if which is not None else list(range(len(self.parts)))
        self.on_gpu = use_gpu and gpu_count() > 0
        self.queries = 0

    @property
    def ntotal(self) -> int:
        return sum(int(index.ntotal) for index, _, _ in self.parts)

    def doc_ids(self) -> Iterator[str]:
        """The held documents' ids, part by part (the legacy layout's global list once)."""
        seen: set[int] = set()
        for _, ids, _ in self.parts:
            if id(ids) not in seen:
                seen.add(id(ids))
                yield from ids

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """The top ``k`` per query over the held parts."""
        self.queries += len(queries)
        return search_hits(self.parts, queries, k)

    def held(self) -> dict[str, Any]:
        """What this searcher holds and has done: process id, node, part numbers, vectors, queries."""
        return {"pid": os.getpid(), "parts": self.which, "ntotal": self.ntotal, "queries": self.queries,
                "gpu": self.on_gpu, **node_identity()}
