"""In-process encode of SciFact documents with bfloat16 weights: eager vs torch.compile variants.

Each variant encodes the same documents with :meth:`Embedder.encode` (length-sorted batches of 64)
on ``--threads`` torch threads, in the order given, and prints its docs/s and its minimum cosine to
the first variant's vectors. Variants:

  fp32                 the model as loaded
  bf16w                ``bf16_copy`` (what ``precision=bf16w`` runs), eager
  compile_freeze       bf16w + ``torch.compile`` (static shapes) with inductor ``freezing``
  compile_freeze_dyn   the same with ``dynamic=True`` (one graph for every sequence length)

A compiled variant's warm-up (compile on the first 128 documents) is printed apart, not timed.

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/encode_compile.py --docs 0 --variants bf16w,compile_freeze,bf16w
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from distributed_ir.config import ModelConfig
from distributed_ir.models.embedder import Embedder, resolve_model_path
from distributed_ir.models.precision import bf16_copy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000, help="first N documents (0 = the whole corpus)")
    ap.add_argument("--variants", default="bf16w,compile_freeze_dyn,bf16w")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    docs = []
    with open(Path(os.environ["IR_DATA_DIR"]) / "scifact" / "corpus.jsonl") as fh:
        for line in fh:
            r = json.loads(line)
            docs.append((r.get("title", "") + " " + r["text"]).strip())
    docs = docs[:args.docs] if args.docs else docs
    emb = Embedder.from_config(ModelConfig(name_or_path=resolve_model_path(args.model))).eval()
    ref = None
    for v in args.variants.split(","):
        model = emb if v == "fp32" else bf16_copy(emb)
        t0 = time.perf_counter()
        if v.startswith("compile"):
            import torch._inductor.config as inductor

            inductor.freezing = "freeze" in v
            model.backbone = torch.compile(model.backbone, dynamic=v.endswith("_dyn"))
            model.encode(docs[:128], "document", 64)  # compile (not timed below)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.encode(docs, "document", 64)
        sec = time.perf_counter() - t0
        ref = out if ref is None else ref
        print(f"{v}: warm-up {warm:.1f} s, encode {sec:.1f} s = {len(docs) / sec:.1f} docs/s, "
              f"min cosine to the first variant {float((out * ref).sum(1).min()):.5f}", flush=True)


if __name__ == "__main__":
    main()
