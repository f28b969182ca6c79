"""Reranking throughput on the same model and pairs, side by side (medians of alternating runs).

    ray      : `distributed-ir rerank`'s Ray Data actor pool (rerank_with_ray), wall time of the
               dataset's execution including actor start-up
    local    : the same RerankStage in this process (model loaded once, not timed)
    local32  : the same, fp32
    st       : sentence-transformers CrossEncoder(path).predict(pairs, batch_size=32), fp32

With --compile, ray and local run the reranker ``torch.compile``d (`distributed-ir rerank --compile`):
ray's time then includes each actor's compile; local is warmed up (compiled) before timing.

Also reports the largest |ray - local| score difference (same precision).

    python benchmarks/rerank_speed.py --model outputs/scifact_ce/train/model \
        --run /path/run.trec --dataset $IR_DATA_DIR/scifact --queries 40 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--queries", type=int, default=40, help="first N queries of the run")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", help="ours (ray/local); st is always fp32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-fp32", action="store_true", help="leave out the local fp32 variant (the slowest)")
    ap.add_argument("--compile", action="store_true", help="ray and local with torch.compile")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from sentence_transformers import CrossEncoder

    from distributed_ir.data.beir import load_beir
    from distributed_ir.eval.metrics import read_run
    from distributed_ir.eval.rerank import RerankStage, candidate_pairs, rerank_with_ray
    from distributed_ir.train.launch import init_ray

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    ds = load_beir(args.dataset, args.split)
    run = read_run(args.run)
    run = {q: run[q] for q in list(run)[: args.queries]}
    pairs = candidate_pairs(run, ds.split_queries(), ds.corpus, args.top_k)
    n = len(pairs["query"])
    local = RerankStage(args.model, args.batch_size, args.precision, "cpu", threads=cores, compile=args.compile)
    if args.compile:
        t0 = time.perf_counter()
        local.score(pairs["query"][:64], pairs["document"][:64])
        print(f"local compile warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    local32 = RerankStage(args.model, args.batch_size, "fp32", "cpu", threads=cores)
    st = CrossEncoder(args.model, device="cpu")
    st_pairs = list(zip(pairs["query"], pairs["document"]))
    init_ray()

    results: dict[str, list[float]] = {"ray": [], "local": [], "local32": [], "st": []}
    ray_scores = local_scores = st_scores = local32_scores = None
    for _ in range(args.runs):
        ray_scores, facts = rerank_with_ray(args.model, pairs, args.batch_size, args.precision, compile=args.compile)
        results["ray"].append(n / facts["seconds"])
        t0 = time.perf_counter()
        local_scores = local.score(pairs["query"], pairs["document"])
        results["local"].append(n / (time.perf_counter() - t0))
        if not args.skip_fp32:
            t0 = time.perf_counter()
            local32_scores = local32.score(pairs["query"], pairs["document"])
            results["local32"].append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        st_scores = st.predict(st_pairs, batch_size=32, convert_to_numpy=True)
        results["st"].append(n / (time.perf_counter() - t0))
        print({k: round(v[-1], 1) for k, v in results.items() if v}, flush=True)
    results = {k: v for k, v in results.items() if v}
    med = {k: round(statistics.median(v), 1) for k, v in results.items()}
    report = {
        "pairs": n, "queries": len(run), "precision": args.precision, "compile": args.compile, "resolved_dtype": str(local.dtype),
        "cores": cores, "runs": {k: [round(x, 1) for x in v] for k, v in results.items()}, "median_pairs_per_s": med,
        "ray_over_local": round(med["ray"] / med["local"], 3), "local_over_st": round(med["local"] / med["st"], 3),
        "ray_over_st": round(med["ray"] / med["st"], 3),
        "max_abs_diff_ray_vs_local": float(np.abs(ray_scores - local_scores).max()),
        "max_abs_diff_local32_vs_st": (float(np.abs(local32_scores - st_scores).max())
                                       if local32_scores is not None else None),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
