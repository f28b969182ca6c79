"""FAISS indexes: build from embedding shards with ``index_factory`` strings, search, merge.

Vectors are scored by inner product (cosine for the normalised embeddings the embedder writes).
External ids are int64 positions into the index's ``doc_ids`` list, so string doc ids survive.
GPU build and search are used only when ``faiss.get_num_gpus() > 0`` (faiss-gpu installed and a
device visible) and the caller allows it; ``faiss-cpu`` has no GPU symbols at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDS_FILE = "doc_ids.json"


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def new_index(dim: int, factory: str):
    """An empty inner-product index from ``index_factory`` string ``factory``; Flat and HNSW
    indexes, which cannot hold external ids themselves, are wrapped in ``IndexIDMap2``."""
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not factory.startswith(("IVF", "IDMap")):
        index = faiss.IndexIDMap2(index)
    return index


def check_trainable(factory: str, dim: int, n: int) -> None:
    """Refuse an IVF index with more lists than vectors to train on (FAISS would only warn)."""
    import faiss

    if not factory.startswith("IVF"):
        return
    nlist = getattr(faiss.try_extract_index_ivf(faiss.index_factory(dim, factory)), "nlist", 0)
    if nlist and n < nlist:
        raise ValueError(f"index {factory!r} has {nlist} lists but only {n} vectors to train on; "
                         f"use fewer lists (rule of thumb: nlist ~ 4*sqrt(N) = {int(4 * n ** 0.5)})")


def _gpu_ok(factory: str, use_gpu: bool) -> bool:
    return use_gpu and gpu_count() > 0 and "HNSW" not in factory  # no GPU HNSW in faiss


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str = "Flat", train_size: int = 100_000,
                use_gpu: bool = True, seed: int = 0, hnsw_ef_search: int = 128, nprobe: int = 16):
    """Build an inner-product index from ``index_factory`` string ``factory`` and add ``ids``.

    IVF/PQ indexes are trained on a random sample of ``train_size`` vectors (in memory: for a
    corpus that does not fit one process use :func:`distributed_ir.index.parts.build_parts`).
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    check_trainable(factory, vectors.shape[1], len(vectors))
    index = new_index(vectors.shape[1], factory)
    on_gpu = _gpu_ok(factory, use_gpu)
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(len(vectors), size=min(train_size, len(vectors)), replace=False)]
        index.train(sample)
    index.add_with_ids(vectors, ids)
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    set_search_params(index, hnsw_ef_search=hnsw_ef_search, nprobe=nprobe)
    return index


def set_search_params(index, hnsw_ef_search: int | None = None, nprobe: int | None = None) -> None:
    """Set nprobe (IVF) / efSearch (HNSW) wherever they live inside wrappers."""
    import faiss

    params = []
    if nprobe is not None:
        params.append(f"nprobe={nprobe}")
    if hnsw_ef_search is not None:
        params.append(f"efSearch={hnsw_ef_search}")
    ps = faiss.ParameterSpace()
    for p in params:
        try:
            ps.set_index_parameters(index, p)
        except RuntimeError:
            pass  # the parameter does not apply to this index type


@dataclass
class ShardedIndex:
    """One or more FAISS indexes over disjoint documents; search merges their top-k."""

    indexes: list
    doc_ids: list[str]

    def search(self, queries: np.ndarray, k: int, batch_size: int = 4096, use_gpu: bool = True,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Scores and positions ``[n, k]`` (position -1 when fewer than k documents)."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, len(self.doc_ids))
        searchers = self.indexes
        if use_gpu and gpu_count() > 0:
            searchers = [faiss.index_cpu_to_all_gpus(ix) if not _is_hnsw(ix) else ix for ix in self.indexes]
        scores = np.empty((len(queries), k), dtype=np.float32)
        positions = np.empty((len(queries), k), dtype=np.int64)
        starts = range(0, len(queries), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="search", unit="batch")
        for start in starts:
            q = queries[start:start + batch_size]
            parts = [ix.search(q, k) for ix in searchers]
            scores[start:start + len(q)], positions[start:start + len(q)] = merge_topk(parts, k)
        return scores, positions

    def save(self, folder: Path) -> None:
        """Write into a fresh sibling folder, then swap it in: no stale shard files survive."""
        import shutil

        import faiss

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, ix in enumerate(self.indexes):
            faiss.write_index(ix, str(tmp / f"index-{i:05d}.faiss"))
        (tmp / IDS_FILE).write_text(json.dumps(self.doc_ids))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)

    @property
    def ntotal(self) -> int:
        return sum(ix.ntotal for ix in self.indexes)


def _is_hnsw(index) -> bool:
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return "HNSW" in type(inner).__name__


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, ids) into the global top-k by score (ids -1 sort last)."""
    if len(parts) == 1:
        return parts[0]
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
