"""Score fusion: a first-stage run with its reranked top-k (``fuse_runs``), and a dense run with a
sparse one into a hybrid first stage (``hybrid_runs``).

For each query, both score lists over the reranked candidates are standardised (z-scores:
``(s - mean) / std`` over that query's candidates; a constant list becomes all zeros), then

    fused(d) = w * z_reranker(d) + (1 - w) * z_first_stage(d)

``w = 1`` is the reranker alone, ``w = 0`` the first stage alone.  Z-scores put a cosine
similarity and an unbounded logit on one scale without a tuned temperature; interpolating a
cross-encoder with the retriever it reranks is the usual way to keep what the retriever knows
when the reranker was trained on little data.
"""

from __future__ import annotations

import numpy as np

from distributed_ir.eval.metrics import Run


def _z(values: np.ndarray) -> np.ndarray:
    std = float(values.std())
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def fuse_runs(first_stage: Run, reranked: Run, weight: float) -> Run:
    """``reranked``'s candidates rescored by the fusion above (every candidate must be in ``first_stage``)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    fused: Run = {}
    for qid, scores in reranked.items():
        docs = list(scores)
        missing = [d for d in docs if d not in first_stage.get(qid, {})]
        if missing:
            raise KeyError(f"query {qid!r}: reranked documents {missing[:3]} are not in the first-stage run")
        rr = _z(np.array([scores[d] for d in docs], dtype=np.float64))
        fs = _z(np.array([first_stage[qid][d] for d in docs], dtype=np.float64))
        fused[qid] = {d: float(weight * a + (1.0 - weight) * b) for d, a, b in zip(docs, rr, fs)}
    return fused


def _minmax(scores: dict[str, float], docs: list[str]) -> np.ndarray:
    """Per-query min-max to [0, 1] over the run's own hits; a document the run lacks scores 0 (its
    minimum); a constant list becomes all zeros."""
    values = np.array(list(scores.values()), dtype=np.float64)
    lo, span = (float(values.min()), float(values.max() - values.min())) if len(values) else (0.0, 0.0)
    return np.array([(scores[d] - lo) / span if d in scores and span > 0 else 0.0 for d in docs])


def hybrid_runs(dense: Run, sparse: Run, weight: float, method: str = "convex", rrf_k: int = 60) -> Run:
    """Fuse a dense and a sparse (BM25) run over the union of their hits, per query.

    ``convex``: ``weight * minmax(dense) + (1 - weight) * minmax(sparse)`` (a run that misses a
    document gives it 0); ``rrf``: reciprocal rank fusion ``weight / (rrf_k + rank_dense) +
    (1 - weight) / (rrf_k + rank_sparse)`` (1-based ranks by the one ranking rule; a miss adds 0).
    ``weight`` 1 = dense only, 0 = sparse only.  Reference: Bruch et al. 2023 (convex combination vs
    RRF); Cormack et al. 2009 (RRF).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"hybrid weight must be in [0, 1], got {weight}")
    if method not in ("convex", "rrf"):
        raise ValueError(f"hybrid method {method!r}: expected convex or rrf")
    from distributed_ir.eval.metrics import rank

    fused: Run = {}
    for qid in dense.keys() | sparse.keys():
        a, b = dense.get(qid, {}), sparse.get(qid, {})
        docs = list(a.keys() | b.keys())
        if method == "convex":
            values = weight * _minmax(a, docs) + (1.0 - weight) * _minmax(b, docs)
        else:
            ra = {d: i for i, d in enumerate(rank(a), 1)}
            rb = {d: i for i, d in enumerate(rank(b), 1)}
            values = np.array([(weight / (rrf_k + ra[d]) if d in ra else 0.0)
                               + ((1.0 - weight) / (rrf_k + rb[d]) if d in rb else 0.0) for d in docs])
        fused[qid] = {d: float(v) for d, v in zip(docs, values)}
    return fused
