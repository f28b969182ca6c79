"""Search a built index with the model that built it; write a TREC run."""

from __future__ import annotations

import time
from pathlib import Path

from distributed_ir.config_loader import ConfigError
from distributed_ir.data.beir import load_qrels, load_queries
from distributed_ir.data.errors import DataError
from distributed_ir.data.intake import InputCheck
from distributed_ir.eval.metrics import Run, write_run
from distributed_ir.index.encode import EncodeStage
from distributed_ir.index.parts import INDEX_JSON, search_parts
from distributed_ir.index.pipeline import MANIFEST
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


def search_index(index_dir: str | Path, queries_path: str | Path, out: str | Path, top_k: int = 100,
                 qrels_path: str | Path | None = None, batch_size: int = 64,
                 precision: str | PrecisionPolicy = "auto",
                 use_gpu: bool = False, progress: bool = True, check: InputCheck | None = None) -> tuple[Run, dict]:
    """Encode queries (the model's saved query settings), search the index shards one at a time,
    merge their top-k by the ranking rule, write the run. ``index_dir`` may be a URI."""
    root = check_search_inputs(index_dir, queries_path, qrels_path)
    manifest = root.read_json(MANIFEST)
    index = root.child("index")
    meta = index.read_json(INDEX_JSON) if index.is_file(INDEX_JSON) else {}
    check = check or InputCheck()
    queries = load_queries(queries_path, check)
    if qrels_path:
        qrels = load_qrels(qrels_path, queries=queries, check=check)
        queries = {q: t for q, t in queries.items() if q in qrels}
    t0 = time.perf_counter()
    stage = EncodeStage(manifest["model"], kind="query", batch_size=batch_size, precision=precision,
                        device="cuda" if use_gpu else "cpu")
    qids = list(queries)
    vectors = stage.encode([queries[q] for q in qids])
    hits = search_parts(index, vectors, top_k)
    run: Run = dict(zip(qids, hits))
    write_run(out, run)
    seconds = time.perf_counter() - t0
    summary = {"queries": len(qids), "top_k": top_k, "seconds": round(seconds, 2),
               "queries_per_s": round(len(qids) / seconds, 1),
               "index_docs": meta.get("ntotal", manifest.get("num_docs")), "run": str(out), "input": check.summary(),
               **flat_summary(summarize_decisions(stage.policy.precision, [stage.decision.to_dict()]))}
    return run, summary
