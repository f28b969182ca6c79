"""Reranking throughput and quality on the same model and pairs, side by side (medians of alternating runs).

    ray         : `distributed-ir rerank`'s Ray Data actor pool (rerank_with_ray) at --precision
                  (default auto), wall time of the dataset's execution including actor start-up
    local       : the same RerankStage in this process at --precision (auto: calibrated before
                  timing, in the precision cache given, default a fresh one)
    local_fp32  : the same, fp32
    local_bf16  : the same, bf16 autocast
    local_bf16w : the same, a copy with bfloat16 weights (no autocast)
    local_int8  : the same, int8 (the body in ONNX Runtime; cross-encoder and ColBERT)
    st          : sentence-transformers CrossEncoder(path).predict(pairs, batch_size=32), fp32

With --compile, ray and local run the reranker ``torch.compile``d (`distributed-ir rerank --compile`):
ray's time then includes each actor's compile; local is warmed up (compiled) before timing.

Reports pairs/s per run and medians, each variant against st, the reranked nDCG@10 of every
variant and its difference to local_fp32's, auto's decision, and the largest |ray - local| score
difference (same precision).

    python benchmarks/rerank_speed.py --model outputs/scifact_ce/train/model \
        --run /path/run.trec --dataset $IR_DATA_DIR/scifact --queries 40 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

VARIANTS = ("ray", "local", "local_fp32", "local_bf16", "local_bf16w", "local_int8", "st")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--queries", type=int, default=40, help="first N queries of the run")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="auto", help="ray and local; the other variants name theirs")
    ap.add_argument("--precision-cache", default="", help="auto's cache (default: a fresh temporary folder)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--skip-fp32", action="store_true", help="leave out local_fp32 (the slowest; no nDCG deltas)")
    ap.add_argument("--compile", action="store_true", help="ray and local with torch.compile")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = args.precision_cache or tempfile.mkdtemp(prefix="rerank-precision-")
    os.environ["DIR_PRECISION_CACHE"] = cache  # the Ray actors (started below) inherit it

    import torch
    from sentence_transformers import CrossEncoder

    from distributed_ir.data.beir import load_beir
    from distributed_ir.eval.metrics import evaluate, read_run
    from distributed_ir.eval.rerank import RerankStage, candidate_pairs, rerank_with_ray
    from distributed_ir.models.precision import PrecisionPolicy
    from distributed_ir.train.launch import init_ray

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    ds = load_beir(args.dataset, args.split)
    run = read_run(args.run)
    run = {q: run[q] for q in list(run)[: args.queries]}
    pairs = candidate_pairs(run, ds.split_queries(), ds.corpus, args.top_k)
    n = len(pairs["query"])
    names = [v for v in args.variants.split(",") if not (args.skip_fp32 and v == "local_fp32")]
    policy = PrecisionPolicy(args.precision, cache_dir=cache)

    def stage(precision, compile_=False):
        return RerankStage(args.model, args.batch_size, precision, "cpu", threads=cores, compile=compile_)

    calls = {}
    local = None
    if "local" in names:
        local = stage(policy, args.compile)
        t0 = time.perf_counter()
        local.score(pairs["query"][:64], pairs["document"][:64])  # auto's calibration / the compile: not timed
        print(f"local warm-up (calibration or compile): {time.perf_counter() - t0:.1f} s", flush=True)
        calls["local"] = local
    for name, precision in (("local_fp32", "fp32"), ("local_bf16", "bf16"), ("local_bf16w", "bf16w"),
                            ("local_int8", "int8")):
        if name in names:
            calls[name] = stage(PrecisionPolicy(precision, cache_dir=cache))
    fns = {name: (lambda s=s: s.score(pairs["query"], pairs["document"])) for name, s in calls.items()}
    if "st" in names:
        st = CrossEncoder(args.model, device="cpu")
        st_pairs = list(zip(pairs["query"], pairs["document"]))
        fns["st"] = lambda: st.predict(st_pairs, batch_size=32, convert_to_numpy=True)
    for fn in fns.values():  # one untimed pass each: kernels, sessions, int8 exports
        fn()
    ray_facts = None
    if "ray" in names:
        init_ray()

        def ray_run():
            nonlocal ray_facts
            scores, ray_facts = rerank_with_ray(args.model, pairs, args.batch_size, policy, compile=args.compile)
            return scores
        fns = {"ray": ray_run, **fns}

    results: dict[str, list[float]] = {k: [] for k in fns}
    scores: dict[str, np.ndarray] = {}
    for r in range(args.runs):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            scores[name] = np.asarray(fns[name](), dtype=np.float32)
            # ray: the dataset's execution time (actor start-up included), as `distributed-ir rerank` reports
            seconds = ray_facts["seconds"] if name == "ray" else time.perf_counter() - t0
            results[name].append(n / seconds)
        print({k: round(v[-1], 1) for k, v in results.items() if v}, flush=True)
    report(args, n, len(run), ds, pairs, results, scores, local, ray_facts, evaluate)


def report(args, n, queries, ds, pairs, results, scores, local, ray_facts, evaluate) -> None:
    med = {k: round(statistics.median(v), 1) for k, v in results.items()}
    ndcg = {}
    for name, s in scores.items():
        reranked: dict[str, dict[str, float]] = {}
        for qid, doc, x in zip(pairs["query_id"], pairs["doc_id"], s):
            reranked.setdefault(qid, {})[doc] = float(x)
        ndcg[name] = round(evaluate(reranked, ds.qrels, ("ndcg@10",))["ndcg@10"], 4)
    print(f"\n{n} pairs ({queries} queries, top {args.top_k}), batch {args.batch_size}, {os.cpu_count()} cores, "
          f"{args.runs} runs; ray/local at --precision {args.precision}\n")
    print("| variant | runs (pairs/s) | median | vs st | reranked nDCG@10 | vs local_fp32 |\n|---|---|---|---|---|---|")
    for name, v in results.items():
        vs_st = f"{med[name] / med['st']:.2f}x" if "st" in med else "-"
        delta = f"{ndcg[name] - ndcg['local_fp32']:+.4f}" if "local_fp32" in ndcg else "-"
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in v)} | {med[name]} | {vs_st} | {ndcg[name]} | {delta} |")
    facts = {"pairs": n, "queries": queries, "precision": args.precision, "compile": args.compile,
             "median_pairs_per_s": med, "ndcg@10": ndcg}
    if local is not None and local.choice.decision is not None:
        facts["local_decision"] = {k: local.choice.decision.to_dict()[k]
                                   for k in ("chosen", "speedup_vs_fp32", "quality", "rejected")}
    if ray_facts is not None:
        facts["ray_precision"] = ray_facts["precision"]["chosen"]
    if "ray" in scores and "local" in scores:
        facts["max_abs_diff_ray_vs_local"] = float(np.abs(scores["ray"] - scores["local"]).max())
    if "local_fp32" in scores and "st" in scores:
        facts["max_abs_diff_local_fp32_vs_st"] = float(np.abs(scores["local_fp32"] - scores["st"]).max())
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
