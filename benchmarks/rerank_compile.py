"""Experiment: cross-encoder pairs/s, eager vs ``torch.compile`` (inductor), both under bf16 autocast.

Same model and pairs (the first --queries queries of a run x top-100), one process, 2 threads,
batch 32, alternating runs; the compiled model is warmed up on 64 pairs first (compile time
reported separately). Prints each run, the medians and the largest score difference.

    python benchmarks/rerank_compile.py --model outputs/ce3/ce_ft/model --run outputs/demo_s2/run.trec \\
        --dataset $IR_DATA_DIR/scifact --queries 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from distributed_ir.data.beir import load_beir
    from distributed_ir.eval.metrics import read_run
    from distributed_ir.eval.rerank import candidate_pairs
    from distributed_ir.models.reranking import load_reranker

    ds = load_beir(args.dataset, "test")
    run = read_run(args.run)
    run = {q: run[q] for q in list(run)[: args.queries]}
    pairs = candidate_pairs(run, ds.split_queries(), ds.corpus, 100)
    queries, docs = pairs["query"], pairs["document"]
    eager = load_reranker(args.model).eval()
    compiled = load_reranker(args.model).eval()
    compiled.model = torch.compile(compiled.model, dynamic=True)
    t0 = time.perf_counter()
    compiled.score_pairs(queries[:64], docs[:64], batch_size=32, dtype=torch.bfloat16)
    print(f"compile warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    speed: dict[str, list[float]] = {"eager": [], "compiled": []}
    scores: dict[str, np.ndarray] = {}
    for r in range(args.runs):
        for name, model in (("eager", eager), ("compiled", compiled)):
            t0 = time.perf_counter()
            scores[name] = model.score_pairs(queries, docs, batch_size=32, dtype=torch.bfloat16)
            speed[name].append(len(queries) / (time.perf_counter() - t0))
            print(f"run {r + 1} {name:>8}: {speed[name][-1]:.1f} pairs/s", flush=True)
    med = {k: statistics.median(v) for k, v in speed.items()}
    print(f"{len(queries)} pairs; medians {med}; compiled/eager {med['compiled'] / med['eager']:.3f}; "
          f"max |diff| {float(np.abs(scores['compiled'] - scores['eager']).max()):.4g}")


if __name__ == "__main__":
    main()
