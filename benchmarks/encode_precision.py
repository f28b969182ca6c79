"""Encode speed and fidelity of all-MiniLM-L6-v2 by precision, one process, same documents, side by side.

Variants (each over the same length-sorted SciFact documents, batch 64, --threads threads):

  fp32            torch, what ``precision=fp32`` runs
  autocast_bf16   fp32 weights under ``torch.autocast(bfloat16)`` (``precision=bf16``)
  bf16_weights    the model cast to bfloat16, no autocast (``precision=bf16w``)
  torch_int8      ``torch.ao.quantization.quantize_dynamic`` on every Linear (fails the 0.99 gate)
  ort_int8        the body exported to ONNX and quantised by ONNX Runtime (``precision=int8``)
  auto            ``EncodeStage(precision=auto)``: what it picks here (its calibration runs first,
                  untimed, in a fresh cache; its decision and calibration time are printed)
  openvino        the fp32 ONNX graph compiled by OpenVINO (its default CPU precision hint: bf16
                  where the CPU has AMX): ``precision=openvino``, an ``auto`` candidate
  st_fp32, st_autocast_bf16   with --st: ``SentenceTransformer.encode`` (batch 64)

Runs alternate (every variant once per run, order reversed on odd runs); the table gives every
run's docs/s, the median, the ratio to fp32's median, the minimum cosine to fp32's vectors and
whether the variant passes the 0.99 gate, then auto against the fastest of its own candidates
(fp32, autocast_bf16, bf16_weights, ort_int8, openvino) that passes it.

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/encode_precision.py --docs 300 --runs 5 --st
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from distributed_ir.config import ModelConfig
from distributed_ir.models.embedder import Embedder, resolve_model_path
from distributed_ir.models.precision import PrecisionPolicy, min_row_cosine

GATE = 0.99


def load_docs(n: int) -> list[str]:
    docs = []
    with open(Path(os.environ["IR_DATA_DIR"]) / "scifact" / "corpus.jsonl") as f:
        for line in f:
            r = json.loads(line)
            docs.append((r.get("title", "") + " " + r["text"]).strip())
            if len(docs) == n:
                break
    return docs


def build_variants(args, docs: list[str], cache: Path) -> tuple[dict[str, Callable[[], np.ndarray]], dict]:
    """Each variant as a zero-argument call encoding ``docs``; plus facts (auto's decision)."""
    from distributed_ir.index.encode import EncodeStage
    from distributed_ir.models.onnx_int8 import OnnxBody, build_int8

    order = np.argsort([-len(t) for t in docs], kind="stable")

    def ours(emb: Embedder, ctx=nullcontext) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            out = np.empty((len(docs), emb.dim), dtype=np.float32)
            with torch.inference_mode(), ctx():
                for s in range(0, len(docs), args.batch_size):
                    idx = order[s:s + args.batch_size]
                    out[idx] = emb(**emb.tokenize([docs[i] for i in idx], "document")).float().numpy()
            return out
        return run

    def load() -> Embedder:
        return Embedder.from_config(ModelConfig(name_or_path=args.model)).eval()

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    base = load()
    variants = {"fp32": ours(base), "autocast_bf16": ours(base, bf16), "bf16_weights": ours(load().to(torch.bfloat16)),
                "torch_int8": ours(torch.ao.quantization.quantize_dynamic(load(), {torch.nn.Linear}, dtype=torch.qint8))}
    path, _ = build_int8(base.backbone, base.onnx_example(), "last_hidden_state", resolve_model_path(args.model),
                         "embedder", cache)
    variants["ort_int8"] = ours(base.with_body(OnnxBody(path, base.backbone.config, "last_hidden_state")))
    facts: dict = {}
    stage = EncodeStage(args.model, batch_size=args.batch_size, device="cpu", threads=args.threads,
                        precision=PrecisionPolicy("auto", cache_dir=str(cache)))
    t0 = time.perf_counter()
    stage.encode(docs[:stage.policy.calibration_texts])  # auto's calibration (cold cache): not timed below
    facts["auto_calibration_s"] = round(time.perf_counter() - t0, 2)
    facts["auto_decision"] = stage.decision.to_dict()
    variants["auto"] = lambda: stage.encode(docs)
    from distributed_ir.models.openvino_body import openvino_missing, openvino_model

    if openvino_missing():
        print(f"no openvino variant: {openvino_missing()}", flush=True)
    else:  # what precision=openvino runs (an auto candidate): the cached fp32 export compiled by OpenVINO
        variants["openvino"] = ours(openvino_model(base, resolve_model_path(args.model), cache, args.threads))
    if args.st:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(resolve_model_path(args.model), device="cpu")

        def st_run(ctx) -> Callable[[], np.ndarray]:
            def run() -> np.ndarray:
                with ctx():
                    out = st.encode(docs, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True)
                return out.astype(np.float32)
            return run
        variants.update({"st_fp32": st_run(nullcontext), "st_autocast_bf16": st_run(bf16)})
    return variants, facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--st", action="store_true", help="also SentenceTransformer.encode, fp32 and bf16 autocast")
    ap.add_argument("--only", default="", help="comma list of variants to run (default: all)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    docs = load_docs(args.docs)
    with tempfile.TemporaryDirectory(prefix="encode-precision-") as tmp:
        variants, facts = build_variants(args, docs, Path(tmp))
        if args.only:
            keep = set(args.only.split(",")) | {"fp32"}
            variants = {k: v for k, v in variants.items() if k in keep}
        # one untimed pass each (warms kernels and sessions; its vectors give the cosines)
        outputs = {name: run() for name, run in variants.items()}
        cos = {name: min_row_cosine(outputs["fp32"], out) for name, out in outputs.items()}
        speed: dict[str, list[float]] = {k: [] for k in variants}
        for run in range(args.runs):
            names = list(variants) if run % 2 == 0 else list(variants)[::-1]
            for name in names:
                t0 = time.perf_counter()
                variants[name]()
                dps = len(docs) / (time.perf_counter() - t0)
                speed[name].append(dps)
                print(f"run {run + 1} {name:>16}: {dps:.1f} docs/s", flush=True)
    report(speed, cos, facts, args)


def report(speed: dict[str, list[float]], cos: dict[str, float], facts: dict, args) -> None:
    med = {k: statistics.median(v) for k, v in speed.items()}
    fp32 = med["fp32"]
    print(f"\n{args.docs} SciFact documents, batch {args.batch_size}, {args.threads} threads, {args.runs} runs\n")
    print("| variant | runs (docs/s) | median | vs fp32 | min cosine to fp32 | gate 0.99 |\n|---|---|---|---|---|---|")
    for name, v in speed.items():
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in v)} | {med[name]:.1f} | {med[name] / fp32:.2f}x "
              f"| {cos[name]:.5f} | {'pass' if cos[name] >= GATE else 'fail'} |")
    decision = facts.get("auto_decision", {})
    print(f"\nauto chose {decision.get('chosen')} (calibration {facts.get('auto_calibration_s')} s on "
          f"{decision.get('calibration_texts')} texts; measured speed-ups {decision.get('speedup_vs_fp32')}; "
          f"not chosen: {decision.get('rejected')})")
    candidates = ("fp32", "autocast_bf16", "bf16_weights", "ort_int8", "openvino")  # what auto measures on a CPU
    ours = {k: m for k, m in med.items() if cos[k] >= GATE and k in candidates}
    if "auto" in med and ours:
        best = max(ours, key=ours.get)
        print(f"auto {med['auto']:.1f} docs/s = {med['auto'] / ours[best]:.3f} x the fastest gated candidate "
              f"({best}, {ours[best]:.1f}); {med['auto'] / fp32:.2f}x fp32")


if __name__ == "__main__":
    main()
