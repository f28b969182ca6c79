"""Search a built index with the model that built it (queries encoded and searched on Ray); write a TREC run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distributed_ir.config_loader import ConfigError
from distributed_ir.data.beir import load_qrels, load_queries
from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import InputCheck
from distributed_ir.eval.metrics import Run, write_run
from distributed_ir.index.parts import INDEX_JSON
from distributed_ir.index.pipeline import MANIFEST
from distributed_ir.index.retrieve import search_queries
from distributed_ir.index.storage import Location
from distributed_ir.models.precision import PrecisionPolicy, flat_summary, summarize_decisions


def check_search_inputs(index_dir: str | Path, queries_path: str | Path,
                        qrels_path: str | Path | None = None) -> Location:
    """The index (its manifest) and the query/qrels files, checked before any model loads."""
    for path in (queries_path, qrels_path):
        if path and not Path(path).is_file():
            raise DataError(path, None, "file not found")
    try:
        root = Location(index_dir)
        found = root.is_file(MANIFEST)
    except OSError as e:
        raise ConfigError(f"index {str(index_dir)!r}: {e}", "index") from e
    if not found:
        raise ConfigError(f"index {root.uri}: no {MANIFEST} (not an `distributed-ir index` --out folder)", "index")
    return root


@contextmanager
def ray_session() -> Iterator[None]:
    """The Ray cluster this process is connected to, else one started (or joined, ``$RAY_ADDRESS``)
    for the block and shut down after it."""
    import ray

    from distributed_ir.train.launch import init_ray

    started = not ray.is_initialized()
    init_ray()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def search_index(index_dir: str | Path, queries_path: str | Path, out: str | Path, top_k: int = 100,
                 qrels_path: str | Path | None = None, batch_size: int = 64,
                 precision: str | PrecisionPolicy = "auto",
                 use_gpu: bool = False, progress: bool = True, check: InputCheck | None = None,
                 actors: int = 0, searchers: int = 0, searcher_gpus: float = 0.0,
                 actor_start_timeout_s: float = 600) -> tuple[Run, dict]:
    """Encode the queries (the model's saved query settings) and search the index on Ray
    (:func:`distributed_ir.index.retrieve.search_queries`: query actors, per-part searcher actors
    when the index has several parts), write the run. ``index_dir`` may be a URI."""
    root = check_search_inputs(index_dir, queries_path, qrels_path)
    manifest = root.read_json(MANIFEST)
    index = root.child("index")
    meta = index.read_json(INDEX_JSON) if index.is_file(INDEX_JSON) else {}
    check = check or InputCheck()
    queries = load_queries(queries_path, check)
    if qrels_path:
        qrels = load_qrels(qrels_path, queries=queries, check=check)
        queries = {q: t for q, t in queries.items() if q in qrels}
    policy = PrecisionPolicy.of(precision)
    decisions: list[dict] = []
    with ray_session():
        t0 = time.perf_counter()
        run = search_queries(root.uri, queries, top_k, batch_size, policy, actors, use_gpu, decisions,
                             actor_start_timeout_s, searchers, searcher_gpus)
        seconds = time.perf_counter() - t0
    write_run(out, run)
    summary = {"queries": len(run), "top_k": top_k, "seconds": round(seconds, 2),
               "queries_per_s": round(len(run) / seconds, 1) if seconds else 0.0,
               "index_docs": meta.get("ntotal", manifest.get("num_docs")), "run": str(out), "input": check.summary(),
               **flat_summary(summarize_decisions(policy.precision, decisions))}
    return run, summary
