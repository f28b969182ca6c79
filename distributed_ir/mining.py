"""Training records from judgements: qrels pairs (:func:`pairs_from_qrels`) and hard-negative
mining (search, take ranks ``[rank_start, rank_end)``, drop positives, write triplets).

The pipeline and the ``distributed-ir mine`` command mine the same way (:func:`mine_from_index`):
the split's queries are encoded and searched on an index folder by the retrieval core's Ray Data
actors (:mod:`distributed_ir.index.retrieve`), the hits ordered by the ranking rule, then
:func:`mine_negatives` cuts the window. Mining works on ids: the texts come from the index's staged
corpus (:class:`~distributed_ir.index.texts.StagedCorpus`, read in Ray tasks), and this process
receives the texts of the records only (digests for the duplicate-text rule).

A mined negative is never a judged document of its query (any qrels row, relevant or not:
a judged non-relevant doc is often a near-duplicate of a positive) nor a document whose text
equals one of the query's positives (duplicate documents under two ids); the counts say how
many candidates each rule removed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

from distributed_ir.data.beir import BeirDataset
from distributed_ir.data.records import TrainRecord
from distributed_ir.index.storage import Location
from distributed_ir.index.texts import StagedCorpus, check_qrels_staged
from distributed_ir.models.precision import PrecisionPolicy, flat_summary, summarize_decisions

Texts = Mapping[str, str] | StagedCorpus  # doc id -> text in this process, or the staged corpus read on Ray


def _corpus(ds: BeirDataset, corpus: Texts | None) -> Texts:
    if corpus is not None:
        return corpus
    if ds.corpus is None:
        raise ValueError("this dataset was loaded without its corpus texts (load_beir(corpus=False)): "
                         "pass the staged corpus (distributed_ir.index.texts.StagedCorpus)")
    return ds.corpus


def _texts(corpus: Texts, ids: Iterable[str]) -> Mapping[str, str]:
    """``{id: text}`` for ``ids``: fetched on Ray from a staged corpus (only these ids), else the mapping."""
    return corpus.texts(ids) if isinstance(corpus, StagedCorpus) else corpus


def relevant_ids(ds: BeirDataset) -> dict[str, list[str]]:
    """Query id -> its relevant (score > 0) documents, for each query that has one, in query-file order."""
    found = {}
    for qid in ds.queries:
        positives = [d for d, rel in (ds.qrels.get(qid) or {}).items() if rel > 0]
        if positives:
            found[qid] = positives
    return found


def pairs_from_qrels(ds: BeirDataset, corpus: Texts | None = None) -> list[TrainRecord]:
    """One pair record per query with at least one relevant (score > 0) document; texts from
    ``corpus`` (default: ``ds.corpus``)."""
    positives = relevant_ids(ds)
    texts = _texts(_corpus(ds, corpus), {d for ids in positives.values() for d in ids})
    return [TrainRecord(query=ds.queries[q], positive=[texts[d] for d in ids]) for q, ids in positives.items()]


def mine_negatives(ds: BeirDataset, ranked: dict[str, list[str]], rank_start: int, rank_end: int, per_query: int,
                   seed: int = 0, corpus: Texts | None = None
                   ) -> tuple[list[TrainRecord], dict[str, int], dict[str, list[str]]]:
    """Records (one per query with a positive), counts, and the chosen negative ids per query.

    Texts come from ``corpus`` (default: ``ds.corpus``); from a staged corpus the duplicate-text
    rule compares text digests, and only the records' own texts are fetched."""
    corpus = _corpus(ds, corpus)
    positives = relevant_ids(ds)
    windows = {q: ranked.get(q, [])[rank_start:rank_end] for q in positives}
    needed = {d for q in positives for d in (*positives[q], *windows[q])}
    same_text = corpus.digests(needed) if isinstance(corpus, StagedCorpus) else corpus
    chosen, counts = choose_negatives(ds.qrels, positives, windows, per_query, seed, same_text)
    texts = _texts(corpus, {d for q in positives for d in (*positives[q], *chosen[q])})
    records = []
    for qid, ids in positives.items():
        records.append(TrainRecord(query=ds.queries[qid], positive=[texts[d] for d in ids],
                                   negative=[texts[d] for d in chosen[qid]]))  # none: in-batch negatives only
    return records, counts, chosen


def choose_negatives(qrels: dict[str, dict[str, int]], positives: dict[str, list[str]],
                     windows: dict[str, list[str]], per_query: int, seed: int,
                     same_text: Mapping[str, Hashable]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Each query's negatives (ids): ``per_query`` drawn (seeded, queries in order) from its rank
    window less its judged documents and less documents whose ``same_text`` key (the text or its
    digest) equals a positive's; plus the counts of what each rule removed."""
    rng = random.Random(seed)
    counts = {"queries": 0, "negatives": 0, "dropped_positives": 0, "dropped_duplicate_text": 0,
              "without_negatives": 0}
    chosen_ids: dict[str, list[str]] = {}
    for qid, ids in positives.items():
        rels = qrels.get(qid) or {}
        counts["queries"] += 1
        window = windows[qid]
        pool = [d for d in window if d not in rels]
        counts["dropped_positives"] += len(window) - len(pool)
        positive_texts = {same_text[d] for d in ids}
        kept = [d for d in pool if same_text[d] not in positive_texts]
        counts["dropped_duplicate_text"] += len(pool) - len(kept)
        chosen = rng.sample(kept, min(per_query, len(kept)))
        chosen_ids[qid] = chosen
        counts["negatives"] += len(chosen)
        counts["without_negatives"] += not chosen
    return chosen_ids, counts


def count_qrels_positives(ds: BeirDataset, chosen: dict[str, list[str]]) -> int:
    """Chosen negatives that are relevant (qrels relevance > 0) for their own query: counted on the
    output, so the summary's ``negatives_that_are_qrels_positives`` is measured, not assumed."""
    return sum(1 for q, ids in chosen.items() for d in ids if (ds.qrels.get(q) or {}).get(d, 0) > 0)


def check_no_judged(ds: BeirDataset, chosen: dict[str, list[str]]) -> None:
    """The guarantee, checked on the output rather than assumed: no negative is judged for its query."""
    leaks = [(q, d) for q, ids in chosen.items() for d in ids if d in (ds.qrels.get(q) or {})]
    if leaks:
        raise AssertionError(f"mined negatives include judged documents: {leaks[:5]}")


def mine_from_index(index_dir: str, ds: BeirDataset, rank_start: int, rank_end: int, per_query: int, seed: int = 0,
                    batch_size: int = 64, precision: str | PrecisionPolicy = "auto", actors: int = 0,
                    use_gpu: bool = False, decisions: list[dict[str, Any]] | None = None, searchers: int = 0
                    ) -> tuple[list[TrainRecord], dict[str, Any]]:
    """Search ``ds``'s split queries on the index (:func:`distributed_ir.index.retrieve.search_queries`:
    query encoding and search on Ray Data actors, ``searchers`` per-part searcher actors as it
    takes them) and mine, the texts read from the index's staged corpus (only those the records
    hold); counts as ``mine`` reports them (``search_seconds`` included)."""
    from distributed_ir.index.retrieve import ranked_ids, search_queries

    if not 0 <= rank_start < rank_end:
        raise ValueError(f"need 0 <= rank_start < rank_end, got {rank_start}, {rank_end}")
    t0 = time.perf_counter()
    run = search_queries(index_dir, ds.split_queries(), rank_end, batch_size, precision, actors, use_gpu, decisions,
                         searchers=searchers)
    search_s = time.perf_counter() - t0
    records, counts, chosen = mine_negatives(ds, ranked_ids(run), rank_start, rank_end, per_query, seed,
                                             StagedCorpus(index_dir))
    leaked = count_qrels_positives(ds, chosen)
    check_no_judged(ds, chosen)
    return records, {**counts, "records": len(records), "negatives_that_are_qrels_positives": leaked,
                     "search_seconds": round(search_s, 2)}


def mine_command(index_dir: str, dataset_dir: str, split: str, out: str, rank_start: int = 10, rank_end: int = 100,
                 per_query: int = 8, seed: int = 42, batch_size: int = 64, precision: str | PrecisionPolicy = "auto",
                 actors: int = 0, searchers: int = 0) -> dict[str, Any]:
    """Search ``split``'s queries on the index, mine, write triplet JSONL and ``<out>.counts.json``."""
    import json

    from distributed_ir.data.beir import load_beir
    from distributed_ir.data.records import write_records

    index = str(Location(index_dir).uri)
    ds = load_beir(dataset_dir, split, corpus=False)  # texts: from the index's staged corpus
    check_qrels_staged([ds], StagedCorpus(index))  # the qrels' document ids, checked there too
    decisions: list[dict[str, Any]] = []
    records, counts = mine_from_index(index, ds, rank_start, rank_end, per_query, seed,
                                      batch_size, precision, actors, decisions=decisions, searchers=searchers)
    write_records(out, records)
    summary = {**counts, "rank_start": rank_start, "rank_end": rank_end, "per_query": per_query, "split": split,
               "out": str(Path(out).resolve()),
               **flat_summary(summarize_decisions(PrecisionPolicy.of(precision).precision, decisions))}
    Path(str(out) + ".counts.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
