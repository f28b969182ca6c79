"""Hard-negative mining: search, take ranks ``[rank_start, rank_end)``, drop positives, write triplets.

The pipeline mines with its in-process index (:func:`mine_negatives` on its own run); the
``distributed-ir mine`` command searches an index built by ``distributed-ir index`` with Ray
Data, query batches spread over an actor pool (:class:`SearchStage`, one index + query encoder
per actor), then applies the same :func:`mine_negatives`.

A mined negative is never a judged document of its query (any qrels row, relevant or not:
a judged non-relevant doc is often a near-duplicate of a positive) nor a document whose text
equals one of the query's positives (duplicate documents under two ids); the counts say how
many candidates each rule removed.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from distributed_ir.data.beir import BeirDataset
from distributed_ir.data.records import TrainRecord
from distributed_ir.eval.metrics import rank
from distributed_ir.models.precision import PrecisionPolicy, collect_decisions, flat_summary, summarize_decisions


def mine_negatives(ds: BeirDataset, ranked: dict[str, list[str]], rank_start: int, rank_end: int, per_query: int,
                   seed: int = 0) -> tuple[list[TrainRecord], dict[str, int], dict[str, list[str]]]:
    """Records (one per query with a positive), counts, and the chosen negative ids per query."""
    rng = random.Random(seed)
    counts = {"queries": 0, "negatives": 0, "dropped_positives": 0, "dropped_duplicate_text": 0,
              "without_negatives": 0}
    records: list[TrainRecord] = []
    chosen_ids: dict[str, list[str]] = {}
    for qid, text in ds.queries.items():
        rels = ds.qrels.get(qid) or {}
        positives = [ds.corpus[d] for d, rel in rels.items() if rel > 0]
        if not positives:
            continue
        counts["queries"] += 1
        window = ranked.get(qid, [])[rank_start:rank_end]
        pool = [d for d in window if d not in rels]
        counts["dropped_positives"] += len(window) - len(pool)
        positive_texts = set(positives)
        kept = [d for d in pool if ds.corpus[d] not in positive_texts]
        counts["dropped_duplicate_text"] += len(pool) - len(kept)
        chosen = rng.sample(kept, min(per_query, len(kept)))
        chosen_ids[qid] = chosen
        if not chosen:
            counts["without_negatives"] += 1
            records.append(TrainRecord(query=text, positive=positives))  # in-batch negatives only
            continue
        counts["negatives"] += len(chosen)
        records.append(TrainRecord(query=text, positive=positives, negative=[ds.corpus[d] for d in chosen]))
    return records, counts, chosen_ids


def count_qrels_positives(ds: BeirDataset, chosen: dict[str, list[str]]) -> int:
    """Chosen negatives that are relevant (qrels relevance > 0) for their own query: counted on the
    output, so the summary's ``negatives_that_are_qrels_positives`` is measured, not assumed."""
    return sum(1 for q, ids in chosen.items() for d in ids if (ds.qrels.get(q) or {}).get(d, 0) > 0)


def check_no_judged(ds: BeirDataset, chosen: dict[str, list[str]]) -> None:
    """The guarantee, checked on the output rather than assumed: no negative is judged for its query."""
    leaks = [(q, d) for q, ids in chosen.items() for d in ids if d in (ds.qrels.get(q) or {})]
    if leaks:
        raise AssertionError(f"mined negatives include judged documents: {leaks[:5]}")


def mine_in_process(embedder: Any, index: Any, ds: BeirDataset, rank_start: int, rank_end: int, per_query: int,
                    seed: int = 0, batch_size: int = 64, bf16: bool = False) -> tuple[list[TrainRecord], dict[str, int]]:
    """Search ``ds``'s split queries on an in-process index (:func:`distributed_ir.eval.retrieval.search`,
    the pipeline's own) and mine; counts as :func:`mine_command` reports them."""
    from distributed_ir.eval.retrieval import ranked_ids, search

    run = search(embedder, index, ds.split_queries(), rank_end, batch_size, bf16)
    records, counts, chosen = mine_negatives(ds, ranked_ids(run), rank_start, rank_end, per_query, seed)
    leaked = count_qrels_positives(ds, chosen)
    check_no_judged(ds, chosen)
    return records, {**counts, "records": len(records), "negatives_that_are_qrels_positives": leaked}


class SearchStage:
    """``__call__({"query_id", "text"}) -> Arrow table (query_id, doc_ids: list<string>)`` (no Ray imports).

    Loads the index and the model that built it once per actor; each list holds the ids found
    (fewer than top_k when the index is smaller), ranked by :func:`distributed_ir.eval.metrics.rank`.
    """

    def __init__(self, index_dir: str, top_k: int, batch_size: int = 64, precision: str | PrecisionPolicy = "auto",
                 device: str = "cpu", threads: int = 0, report_precision: bool = False):
        import json

        import torch

        from distributed_ir.index.encode import EncodeStage
        from distributed_ir.index.faiss_index import ShardedIndex
        from distributed_ir.index.pipeline import MANIFEST

        if threads:
            torch.set_num_threads(threads)
        root = Path(index_dir)
        manifest = json.loads((root / MANIFEST).read_text())
        self.index = ShardedIndex.load(root / "index")
        self.encoder = EncodeStage(manifest["model"], kind="query", batch_size=batch_size, precision=precision,
                                   device=device, threads=threads)
        self.top_k = top_k
        self.use_gpu = device == "cuda"
        self.report_precision = report_precision

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        vectors = self.encoder.encode([str(t) for t in batch["text"]])
        scores, positions = self.index.search(vectors, self.top_k, use_gpu=self.use_gpu, progress=False)
        # Ranked by evaluation's rule (ties by doc id, not FAISS's order): the window mined is the
        # window `search`/`evaluate` rank there.
        ids = [rank({self.index.doc_ids[p]: float(s) for s, p in zip(srow, prow) if p >= 0})
               for srow, prow in zip(scores, positions)]
        # An Arrow list<string> column: Ray stores it natively (a 2-D object array would be pickled).
        columns = {"query_id": pa.array([str(q) for q in batch["query_id"]], pa.string()),
                   "doc_ids": pa.array(ids, pa.list_(pa.string()))}
        if self.report_precision:  # the query encoder's precision decision, on the first row returned
            columns["precision_decision"] = pa.array(self.encoder.choice.report_column(len(ids)).tolist(), pa.string())
        return pa.table(columns)


def search_with_ray(index_dir: str | Path, queries: dict[str, str], top_k: int, batch_size: int = 64,
                    precision: str | PrecisionPolicy = "auto", actors: int = 0,
                    decisions: list[dict[str, Any]] | None = None) -> dict[str, list[str]]:
    """Ranked doc ids per query, query batches spread over a Ray Data actor pool; the actors'
    precision decisions are appended to ``decisions`` when given."""
    import ray
    from ray.data import ActorPoolStrategy

    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = actors or max(1, min(cpus, len(queries) // batch_size + 1))
    qids = list(queries)
    table = pa.table({"query_id": qids, "text": [queries[q] for q in qids]})
    ds = ray.data.from_arrow(table).repartition(max(1, min(len(qids), 4 * size)))
    # 0.5 CPU per actor leaves room for Ray Data's own tasks on a small node (DESIGN.md pitfalls).
    ds = ds.map_batches(SearchStage, fn_constructor_kwargs={
        "index_dir": str(Path(index_dir).resolve()), "top_k": top_k, "batch_size": batch_size,
        "precision": precision, "threads": max(1, cpus // size), "report_precision": decisions is not None},
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=size), num_cpus=0.5)
    ranked: dict[str, list[str]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for qid, ids in zip(batch["query_id"], batch["doc_ids"]):
            ranked[str(qid)] = [str(d) for d in ids]
        if decisions is not None:
            decisions += collect_decisions(batch["precision_decision"])
    return ranked


def mine_command(index_dir: str, dataset_dir: str, split: str, out: str, rank_start: int = 10, rank_end: int = 100,
                 per_query: int = 8, seed: int = 42, batch_size: int = 64, precision: str | PrecisionPolicy = "auto",
                 actors: int = 0) -> dict[str, Any]:
    """Search ``split``'s queries on the index, mine, write triplet JSONL and ``<out>.counts.json``."""
    import json

    from distributed_ir.data.beir import load_beir
    from distributed_ir.data.records import write_records

    if not 0 <= rank_start < rank_end:
        raise ValueError(f"need 0 <= rank_start < rank_end, got {rank_start}, {rank_end}")
    ds = load_beir(dataset_dir, split)
    queries = ds.split_queries()
    t0 = time.perf_counter()
    decisions: list[dict[str, Any]] = []
    ranked = search_with_ray(index_dir, queries, rank_end, batch_size, precision, actors, decisions)
    search_s = time.perf_counter() - t0
    missing = sorted(set(queries) - set(ranked))
    if missing:
        raise RuntimeError(f"{len(missing)} queries came back without results, e.g. {missing[:3]}")
    records, counts, chosen = mine_negatives(ds, ranked, rank_start, rank_end, per_query, seed)
    leaked = count_qrels_positives(ds, chosen)
    check_no_judged(ds, chosen)
    write_records(out, records)
    summary = {**counts, "records": len(records), "negatives_that_are_qrels_positives": leaked,
               "rank_start": rank_start, "rank_end": rank_end, "per_query": per_query, "split": split,
               "search_seconds": round(search_s, 2), "out": str(Path(out).resolve()),
               **flat_summary(summarize_decisions(PrecisionPolicy.of(precision).precision, decisions))}
    Path(str(out) + ".counts.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
