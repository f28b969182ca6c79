"""Score fusion of a first-stage run and its reranked top-k.

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
