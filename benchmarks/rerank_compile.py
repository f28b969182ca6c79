"""Experiment: cross-encoder pairs/s under bf16 autocast: eager, ``torch.compile`` (inductor) and
eager with the matmul attention (``attn_implementation="eager"``) instead of SDPA.

Same model and pairs (the first --queries queries of a run x top-100), one process, 2 threads,
batch 32, alternating runs; the compiled model (``RerankerBase.compile_backbone``, what
``rerank --compile`` does) is warmed up on 64 pairs first (compile time reported separately).
Prints each run, the medians and the largest score difference. ``--profile`` also prints a
``torch.profiler`` table of one eager pass (where the forward's time goes, op by op).

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
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one eager pass")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from distributed_ir.data.beir import load_beir
    from distributed_ir.eval.metrics import read_run
    from distributed_ir.eval.rerank import candidate_pairs
    from distributed_ir.models.rerankers import load_reranker

    ds = load_beir(args.dataset, "test")
    run = read_run(args.run)
    run = {q: run[q] for q in list(run)[: args.queries]}
    pairs = candidate_pairs(run, ds.split_queries(), ds.corpus, 100)
    queries, docs = pairs["query"], pairs["document"]
    eager = load_reranker(args.model).eval()
    matmul_attn = load_reranker(args.model).eval()
    matmul_attn.model.set_attn_implementation("eager")
    compiled = load_reranker(args.model).eval()
    compiled.compile_backbone()
    t0 = time.perf_counter()
    compiled.score_pairs(queries[:64], docs[:64], batch_size=32, dtype=torch.bfloat16)
    print(f"compile warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            eager.score_pairs(queries, docs, batch_size=32, dtype=torch.bfloat16)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    models = {"eager": eager, "compiled": compiled, "matmul_attention": matmul_attn}
    speed: dict[str, list[float]] = {name: [] for name in models}
    scores: dict[str, np.ndarray] = {}
    for r in range(args.runs):
        for name, model in models.items():
            t0 = time.perf_counter()
            scores[name] = model.score_pairs(queries, docs, batch_size=32, dtype=torch.bfloat16)
            speed[name].append(len(queries) / (time.perf_counter() - t0))
            print(f"run {r + 1} {name:>16}: {speed[name][-1]:.1f} pairs/s", flush=True)
    med = {k: round(statistics.median(v), 1) for k, v in speed.items()}
    print(f"{len(queries)} pairs; medians {med}; compiled/eager {med['compiled'] / med['eager']:.3f}; "
          f"matmul_attention/eager {med['matmul_attention'] / med['eager']:.3f}; max |diff| to eager: "
          + ", ".join(f"{k} {float(np.abs(scores[k] - scores['eager']).max()):.4g}" for k in models if k != "eager"))


if __name__ == "__main__":
    main()
