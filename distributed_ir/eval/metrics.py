"""Retrieval metrics with trec_eval semantics (equal to pytrec_eval to 1e-9, tested).

Semantics copied from trec_eval 9:
- a run is ranked by score descending, ties broken by doc id descending (string order);
- relevant means qrels relevance >= 1; graded gains are the relevance values (negative -> 0);
- nDCG@k (``ndcg_cut.k``): DCG = sum gain / log2(rank + 1) over the top k, ideal DCG from the
  qrels' relevance values sorted descending, cut at k;
- Recall@k (``recall.k``): relevant retrieved in the top k / relevant in qrels;
- MAP@k (``map_cut.k``): sum of precision at each relevant rank <= k / relevant in qrels;
- MRR@k: 1 / rank of the first relevant doc within the top k (``recip_rank`` of the run cut at k);
- only queries present in both run and qrels are evaluated (trec_eval's default, no ``-c``);
  queries with no relevant documents score 0 on every measure.
"""

from __future__ import annotations

import math
from pathlib import Path

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@100", "map@100")


def rank(scores: dict[str, float]) -> list[str]:
    """Doc ids by score descending; ties by doc id descending (trec_eval's order).

    The project's one ranking rule: evaluation, run files, reranking candidates and hard-negative
    mining all order hits with it, so a rank window means the same documents everywhere.
    """
    return [d for d, _ in sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)]


def ndcg_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    num_rel = sum(1 for r in rels.values() if r > 0)
    if num_rel == 0:
        return 0.0
    return sum(1 for d in ranked[:k] if rels.get(d, 0) > 0) / num_rel


def map_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    num_rel = sum(1 for r in rels.values() if r > 0)
    if num_rel == 0:
        return 0.0
    hits, total = 0, 0.0
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            hits += 1
            total += hits / (i + 1)
    return total / num_rel


def mrr_at(ranked: list[str], rels: dict[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if rels.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


_MEASURES = {"ndcg": ndcg_at, "recall": recall_at, "map": map_at, "mrr": mrr_at}


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``."""
    base, sep, k = name.partition("@")
    if base not in _MEASURES or not sep or not k.isdigit() or int(k) < 1:
        raise ValueError(f"unknown metric {name!r}: expected ndcg@k, mrr@k, recall@k or map@k")
    return base, int(k)


def evaluate_per_query(run: Run, qrels: Qrels, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """Per-query values for queries in both run and qrels."""
    parsed = [(m, *parse_metric(m)) for m in metrics]
    out = {}
    for qid, scores in run.items():
        if qid not in qrels:
            continue
        ranked = rank(scores)
        out[qid] = {m: _MEASURES[base](ranked, qrels[qid], k) for m, base, k in parsed}
    return out


def evaluate(run: Run, qrels: Qrels, metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over evaluated queries, plus ``num_queries`` and the misses."""
    per_query = evaluate_per_query(run, qrels, metrics)
    n = len(per_query)
    result: dict[str, float] = {m: (sum(v[m] for v in per_query.values()) / n if n else 0.0) for m in metrics}
    result["num_queries"] = n
    result["num_qrels_queries_missing_from_run"] = sum(1 for q in qrels if q not in run)
    return result


def read_run(path: str | Path) -> Run:
    """Read a TREC run file ``qid Q0 docid rank score tag``; errors name file and line."""
    from distributed_ir.data.errors import DataError

    run: Run = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            cols = line.split()
            if len(cols) != 6:
                raise DataError(path, lineno, f"expected 6 columns (qid Q0 docid rank score tag), got {len(cols)}")
            try:
                score = float(cols[4])
            except ValueError:
                raise DataError(path, lineno, f"score {cols[4]!r} is not a number", field="score") from None
            if cols[2] in run.setdefault(cols[0], {}):
                raise DataError(path, lineno, f"document {cols[2]!r} listed twice for query {cols[0]!r}")
            run[cols[0]][cols[2]] = score
    return run


def write_run(path: str | Path, run: Run, tag: str = "distributed-ir") -> Path:
    """Write a TREC run file, each query ranked as trec_eval would rank it.

    Scores are written in full precision (``repr`` of the float: the shortest text that reads back
    as the same float64, so float32 scores survive too); rounding would turn close scores into
    ties that trec_eval then breaks by doc id, and the file would no longer evaluate as the run did.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for qid, scores in run.items():
            for i, doc in enumerate(rank(scores), start=1):
                fh.write(f"{qid} Q0 {doc} {i} {float(scores[doc])!r} {tag}\n")
    tmp.replace(path)
    return path
