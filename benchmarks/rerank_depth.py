"""Reranked / fused nDCG@10 at smaller ``reranker.top_k`` values, from one pipeline run's files.

A ColBERT or cross-encoder reranker scores each (query, document) pair on its own, so the top-k
candidates' scores for any k below the run's own top_k are already in ``run_reranked.trec``:
this reranks and fuses (``eval.fusion.fuse_runs``, weight from ``--fuse``) each query's first k
candidates of the first-stage run (hybrid when there is one); documents below k keep the first
stage's order.  k = the run's top_k reproduces the pipeline's own reranked / fused rows.

    python benchmarks/rerank_depth.py outputs/scifact_minilm --qrels $IR_DATA_DIR/scifact --depths 100 75 50 30 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distributed_ir.data.beir import load_beir
from distributed_ir.eval.fusion import fuse_runs
from distributed_ir.eval.metrics import Run, evaluate, read_run


def with_tail(top: Run, first: Run) -> Run:
    """``top`` (scores of the reranked candidates) followed by the rest of ``first`` in its order."""
    out: Run = {}
    for q, scores in top.items():
        floor = min(scores.values())
        rest = sorted(((d, v) for d, v in first[q].items() if d not in scores), key=lambda x: -x[1])
        out[q] = {**scores, **{d: floor - 1 - i for i, (d, _) in enumerate(rest)}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a pipeline output folder (run_reranked.trec, run_hybrid.trec or run.trec)")
    ap.add_argument("--qrels", type=Path, required=True, help="the BEIR dataset folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--fuse", type=float, default=0.5)
    ap.add_argument("--depths", type=int, nargs="+", default=[100, 75, 50, 30, 20])
    args = ap.parse_args()
    qrels = load_beir(args.qrels, args.split).qrels
    first_path = args.run_dir / ("run_hybrid.trec" if (args.run_dir / "run_hybrid.trec").is_file() else "run.trec")
    first, reranked = read_run(first_path), read_run(args.run_dir / "run_reranked.trec")
    print(f"first stage: {first_path.name}\n\n| top_k | reranked nDCG@10 | fused nDCG@10 |\n|---|---|---|")
    for k in args.depths:
        top = {q: dict(sorted(s.items(), key=lambda x: -x[1])[:k]) for q, s in first.items() if q in reranked}
        rr = {q: {d: reranked[q][d] for d in docs} for q, docs in top.items()}
        r = evaluate(with_tail(rr, first), qrels)["ndcg@10"]
        f = evaluate(with_tail(fuse_runs(top, rr, args.fuse), first), qrels)["ndcg@10"]
        print(f"| {k} | {r:.4f} | {f:.4f} |")


if __name__ == "__main__":
    main()
