"""GPU readiness: the project's encode, rerank and training code on one CUDA GPU, plain torch (no Ray).

A machine with a GPU may lack Ray, FAISS and DeepSpeed (the lent H200 has none of them and no
network), so this runs the same classes the Ray actors run, in one process:

    encode   : ``index.encode.EncodeStage`` (what `distributed-ir index` puts on each GPU actor),
               all-MiniLM-L6-v2 (the default model) and a BERT-base-shaped body (random weights,
               same tokenizer), fp32 / fp16 / bf16 autocast / bf16w (bfloat16 weights) at several batch sizes: docs/s,
               tokens/s (non-padding tokens), smallest cosine to fp32 over every text;
               then ``precision: auto`` (what it measures and picks on this GPU).
    rerank   : ``eval.rerank.RerankStage`` (the `rerank` actor) with a MiniLM cross-encoder (random
               head: throughput only), pairs/s per precision and batch size, and auto's decision.
    train    : ``train.loop.train_loop`` (the Ray Train worker's loop, run without Ray: world size
               1, DDP engine) on SciFact train pairs, fp32 and bf16: samples/s; then a resume
               check: a run checkpointed at step 2 and resumed must end with the weights of the
               uninterrupted run (dropout on, so the CUDA RNG state must be restored), next to
               a resume that skips the CUDA RNG (must differ) and a second uninterrupted run (the
               GPU's own noise floor).
    llm      : the same loop with DeepSpeed ZeRO-2 (bf16, torch AdamW) and LoRA (all linear layers)
               on a Qwen2 body of Qwen2-0.5B's shape built in code (24 x 896, GQA 14/2 heads, vocab
               151,936; random weights, last-token pooling): samples/s, tokens/s (non-padding
               query + document tokens) and peak GPU memory per batch size.  Needs DeepSpeed
               (carry its wheel: README "GPU check").

Two steps, because the GPU machine has no copy of the model package or of SciFact:

    # here: model (fp16 safetensors, ~45 MB) + 4096 SciFact docs, queries and train pairs
    python benchmarks/gpu_check.py pack --out .gpu_pack --data $IR_DATA_DIR/scifact
    # on the GPU machine (repo root; .gpu_pack carried):
    PYTHONPATH=. python3 benchmarks/gpu_check.py run --pack .gpu_pack --out $OUT

``run`` prints a markdown table and writes ``gpu_check.json`` / ``gpu_check.md`` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

SKIP_FILES = {"model.safetensors", ".gitattributes", "README.md", "data_config.json"}


# ---------------------------------------------------------------------------------------- pack
def pack(out: Path, data: Path, docs: int) -> None:
    """Model folder (weights as fp16) + SciFact texts, small enough to travel (< 50 MB)."""
    import torch
    from safetensors.torch import load_file, save_file

    from distributed_ir.models.embedder import resolve_model_path

    src = Path(resolve_model_path("default"))
    model = out / "model"
    if out.exists():
        shutil.rmtree(out)
    model.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in SKIP_FILES:
            continue
        (shutil.copytree if f.is_dir() else shutil.copy)(f, model / f.name)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              str(model / "weights_fp16.safetensors"))
    corpus = {}
    with open(data / "corpus.jsonl") as f:
        for line in f:
            row = json.loads(line)
            corpus[row["_id"]] = f"{row.get('title', '')} {row['text']}".strip()
    queries = {}
    with open(data / "queries.jsonl") as f:
        for line in f:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    pairs = []
    with open(data / "qrels" / "train.tsv") as f:
        next(f)
        for line in f:
            qid, did, rel = line.rstrip("\n").split("\t")[:3]
            if int(rel) > 0 and qid in queries and did in corpus:
                pairs.append({"query": queries[qid], "positive": [corpus[did]]})
    texts = {"documents": list(corpus.values())[:docs],
             "queries": [queries[q] for q in list(queries)[:512]]}
    (out / "texts.json").write_text(json.dumps(texts))
    with open(out / "train.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"packed {out}: {len(texts['documents'])} docs, {len(texts['queries'])} queries, "
          f"{len(pairs)} train pairs, {size / 2**20:.1f} MiB")


# ---------------------------------------------------------------------------------------- run
def fp32_model(pack_dir: Path, work: Path) -> Path:
    """The packed fp16 weights back in fp32, so 'fp32' really is fp32 whatever the default dtype."""
    import torch
    from safetensors.torch import load_file, save_file

    dst = work / "minilm"
    shutil.copytree(pack_dir / "model", dst, ignore=shutil.ignore_patterns("weights_fp16.safetensors"))
    weights = load_file(str(pack_dir / "model" / "weights_fp16.safetensors"))
    save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()},
              str(dst / "model.safetensors"))
    return dst


def base_sized_model(minilm: Path, work: Path) -> Path:
    """A BERT-base-shaped body (12 x 768, ~110M parameters, random weights) with MiniLM's tokenizer
    and pooling: the size of bge-base / e5-base, for throughput only."""
    import torch
    from transformers import BertConfig, BertModel

    dst = work / "bert_base"
    shutil.copytree(minilm, dst, ignore=lambda d, names: {"model.safetensors", "config.json"} if d == str(minilm) else set())
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, vocab_size=30522)).save_pretrained(dst)
    return dst


TOKENIZE_THREADS: list = [None]  # `run --tokenize-threads 1,8`: Embedder.tokenize_threads per cell (None: default)
DEVICE = "cuda"  # `run --device cpu`: a dry run of this script's code paths on a machine without a GPU


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


ENCODE_BATCHES: list = [32, 128, 512]  # `run --encode-batches 128,512`: the MiniLM encode sweep
PRECISIONS: list = []  # `run --precisions fp16,bf16`: only these (default: every one the device has)


def precisions() -> tuple[str, ...]:
    # fp16 is GPU-only here; bf16w: a copy with bfloat16 weights (an auto candidate, like bf16 autocast)
    every = ("fp32", "fp16", "bf16", "bf16w") if DEVICE == "cuda" else ("fp32", "bf16", "bf16w")
    return tuple(p for p in every if p in PRECISIONS) if PRECISIONS else every


def timed(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def encode_section(name: str, model: Path, texts: list[str], batch_sizes: list[int], runs: int,
                   inline: tuple[str, ...] = ("fp32", "fp16")) -> list[dict]:
    import torch

    from distributed_ir.index.encode import EncodeStage
    from distributed_ir.models.precision import PrecisionPolicy, min_row_cosine

    rows = []
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stage0 = EncodeStage(str(model), kind="document", precision="fp32", device=DEVICE)
    lens = stage0.embedder.tokenize(texts, "document")["attention_mask"].sum(1)
    tokens = int(lens.sum())
    ref = stage0.encode(texts)  # fp32: the cosine reference
    for bs in batch_sizes:
        # tokenise in line (the loop before session 11) next to the threads that tokenise ahead
        # (Embedder.tokenize_threads; on a GPU the default is the host's CPUs per GPU, at most 4)
        cells = ([(prec, t) for t in TOKENIZE_THREADS for prec in precisions()]
                 + [(p, 0) for p in inline if p in precisions()])
        for prec, tok_threads in cells:
            stage = EncodeStage(str(model), kind="document", batch_size=bs, precision=prec, device=DEVICE)
            stage.embedder.tokenize_threads = tok_threads
            threads_used = stage.embedder._tokenize_threads(stage.embedder.device)
            stage.encode(texts[: bs * 2])  # warm-up (kernels, allocator)
            out = {}

            def go(stage=stage, out=out):
                out["v"] = stage.encode(texts)

            med, times = timed(go, runs)
            cos = min_row_cosine(ref, out["v"])
            rows.append({"section": "encode", "model": name, "batch": bs, "precision": prec,
                         "tokenize_threads": threads_used,
                         "docs_per_s": len(texts) / med, "tokens_per_s": tokens / med,
                         "seconds": times, "min_cosine_vs_fp32": cos,
                         "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else 0.0})
            print(f"encode {name} bs={bs} {prec} tokenize_threads={threads_used}: {len(texts) / med:.0f} docs/s, "
                  f"{tokens / med:.0f} tok/s, cos {cos:.5f}", flush=True)
            del stage
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    cache = tempfile.mkdtemp(prefix="prec-")
    stage = EncodeStage(str(model), kind="document", batch_size=128, device=DEVICE,
                        precision=PrecisionPolicy(precision="auto", cache_dir=cache, calibration_texts=256))
    stage.encode(texts[:512])
    rows.append({"section": "auto", "model": name, "role": "embedder", "decision": stage.decision.to_dict()})
    print(f"auto {name}: {stage.decision.summary()}", flush=True)
    return rows


def rerank_section(minilm: Path, work: Path, queries: list[str], docs: list[str], batch_sizes: list[int],
                   runs: int) -> list[dict]:
    import torch

    from distributed_ir.eval.rerank import RerankStage
    from distributed_ir.models.cross_encoder import CrossEncoderReranker
    from distributed_ir.models.precision import PrecisionPolicy

    ce = work / "cross_encoder"
    torch.manual_seed(0)
    CrossEncoderReranker.from_pretrained(str(minilm)).save(ce)
    docs = docs[:1024]  # pairs are tokenised in line: 1,024 fit the check's time budget
    q = [queries[i % len(queries)] for i in range(len(docs))]
    rows, ref = [], None
    for bs in batch_sizes:
        for prec in precisions():
            stage = RerankStage(str(ce), batch_size=bs, precision=prec, device=DEVICE)
            stage.score(q[: bs * 2], docs[: bs * 2])
            out = {}

            def go(stage=stage, out=out):
                out["s"] = stage.score(q, docs)

            med, times = timed(go, runs)
            if prec == "fp32" and ref is None:
                ref = out["s"]
            r = float(np.corrcoef(ref, out["s"])[0, 1])
            rows.append({"section": "rerank", "model": "minilm-cross-encoder", "batch": bs, "precision": prec,
                         "pairs_per_s": len(docs) / med, "seconds": times, "pearson_vs_fp32": r})
            print(f"rerank bs={bs} {prec}: {len(docs) / med:.0f} pairs/s, r {r:.5f}", flush=True)
            del stage
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    stage = RerankStage(str(ce), batch_size=128, device=DEVICE,
                        precision=PrecisionPolicy(precision="auto", cache_dir=tempfile.mkdtemp(prefix="prec-"),
                                                  calibration_texts=256))
    stage.score(q[:512], docs[:512])
    rows.append({"section": "auto", "model": "minilm-cross-encoder", "role": "reranker",
                 "decision": stage.choice.decision.to_dict()})
    print(f"auto cross-encoder: {stage.choice.decision.summary()}", flush=True)
    return rows


def _train(model_path: Path, records: Path, out: Path, /, **kw) -> dict:
    from distributed_ir.train.loop import train_loop

    cfg = {"train_path": str(records), "output_dir": str(out), "model": {"name_or_path": str(model_path)},
           "scaling": {"use_gpu": DEVICE == "cuda"}, "seed": 7, **kw}
    return train_loop(cfg)


def _final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / "final" / "model" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def train_section(minilm: Path, records: Path, work: Path, steps: int, batch: int) -> list[dict]:
    import torch

    import distributed_ir.train.checkpoint as ckpt

    rows = []
    for name, kw in (("fp32", {}), ("bf16", {"bf16": True})):
        res = _train(minilm, records, work / f"speed_{name}", batch_size=batch, max_steps=steps,
                     log_every=max(1, steps // 3), **kw)
        windows = [h["samples_per_s"] for h in res["history"]][1:]  # first window holds warm-up
        rows.append({"section": "train", "precision": name, "batch": batch, "steps": steps,
                     "samples_per_s": statistics.median(windows), "windows": windows,
                     "final_loss": res["history"][-1]["loss"], "peak_gpu_mb": res.get("peak_gpu_mb")})
        print(f"train {name} bs={batch}: {statistics.median(windows):.0f} samples/s, "
              f"loss {res['history'][-1]['loss']:.4f}", flush=True)
    # resume exactness (dropout on: the CUDA RNG drives it)
    kw = {"batch_size": min(32, batch), "max_steps": 4, "checkpoint_every": 2, "log_every": 1}
    _train(minilm, records, work / "full_a", **kw)
    _train(minilm, records, work / "full_b", **kw)
    step2 = work / "full_a" / "checkpoints" / "step_0000002"
    _train(minilm, records, work / "resumed", resume_from=str(step2), **kw)
    original = ckpt.set_rng_state

    def cpu_only(state):
        torch.set_rng_state(state["torch_rng"])

    ckpt.set_rng_state = cpu_only
    try:
        _train(minilm, records, work / "resumed_no_cuda_rng", resume_from=str(step2), **kw)
    finally:
        ckpt.set_rng_state = original
    a = _final_weights(work / "full_a")
    row = {"section": "resume", "steps": 4, "resumed_at": 2,
           "uninterrupted_vs_uninterrupted": _max_diff(a, _final_weights(work / "full_b")),
           "resumed_vs_uninterrupted": _max_diff(a, _final_weights(work / "resumed")),
           "resumed_without_cuda_rng_vs_uninterrupted": _max_diff(a, _final_weights(work / "resumed_no_cuda_rng"))}
    rows.append(row)
    print("resume: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return rows


LLM_SHAPE = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151936}


def qwen2_body(minilm: Path, work: Path, shape: dict) -> tuple[Path, int]:
    """A Qwen2 body of the given shape (random weights), MiniLM's tokenizer with [SEP] as EOS."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    dst = work / "qwen2"
    tok = AutoTokenizer.from_pretrained(str(minilm))
    tok.eos_token = tok.sep_token
    tok.padding_side = "left"
    cfg = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      intermediate_size=shape["intermediate"], max_position_embeddings=2048,
                      eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(DEVICE):  # random init on the GPU: seconds, not a minute of CPU
        model = Qwen2Model(cfg)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    n = sum(p.numel() for p in model.parameters())
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return dst, n


def llm_section(minilm: Path, records: Path, work: Path, steps: int, batches: list[int], shape: dict) -> list[dict]:
    """train_loop at world size 1 with DeepSpeed ZeRO-2 bf16 + LoRA on a Qwen2-0.5B-shaped body."""
    import torch
    from transformers import AutoTokenizer

    model, n_params = qwen2_body(minilm, work, shape)
    print(f"qwen2 body: {n_params / 1e6:.0f}M parameters", flush=True)
    q_len, d_len = 64, 256
    # non-padding tokens per record as the loop sees them (query + its positive, truncated; the
    # loop's query instruction and EOS add a few more, not counted here)
    tok = AutoTokenizer.from_pretrained(str(model))
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    q_tok = [min(q_len, len(tok(r["query"])["input_ids"])) for r in recs]
    d_tok = [min(d_len, len(tok(r["positive"][0])["input_ids"])) for r in recs]
    per_record = (sum(q_tok) + sum(d_tok)) / len(recs)
    rows = []
    for batch in batches:
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        res = _train(model, records, work / f"llm_{batch}", batch_size=batch, max_steps=steps,
                     log_every=max(1, steps // 3), checkpoint_every=10**6, bf16=True,
                     model={"name_or_path": str(model), "query_max_length": q_len, "document_max_length": d_len},
                     engine={"name": "deepspeed", "zero_stage": 2},
                     lora={"enabled": True, "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["all-linear"],
                           "export": "adapter"},
                     optim={"lr": 1e-4, "warmup_ratio": 0.0})
        windows = [h["samples_per_s"] for h in res["history"]][1:] or [res["history"][-1]["samples_per_s"]]
        sps = statistics.median(windows)
        last = res["history"][-1]
        rows.append({"section": "llm", "params_m": n_params / 1e6, "batch": batch, "steps": steps,
                     "samples_per_s": sps, "tokens_per_s": sps * per_record, "windows": windows,
                     "tokens_per_record": per_record, "final_loss": last["loss"],
                     "peak_gpu_mb": last.get("peak_gpu_mb") or 0.0, "state_mb": last.get("state_mb")})
        print(f"llm zero2 bf16 lora bs={batch}: {sps:.1f} samples/s, {sps * per_record:.0f} tok/s, "
              f"peak {rows[-1]['peak_gpu_mb']:.0f} MiB, loss {last['loss']:.4f}", flush=True)
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"GPU check on {env['gpu']} ({env['torch']}, transformers {env['transformers']}, "
             f"CUDA {env['cuda']}), {env['date']}", ""]
    enc = [r for r in rows if r["section"] == "encode"]
    if enc:
        # vs fp32: the fp32 cell with the same model, batch and tokenising threads (nan: none measured)
        base = {(r["model"], r["batch"], r["tokenize_threads"]): r["docs_per_s"] for r in enc if r["precision"] == "fp32"}
        lines += ["| encode model | batch | precision | tokenise threads | docs/s | tokens/s | vs fp32 | "
                  "min cosine vs fp32 | peak GPU MiB |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['precision']} | {r.get('tokenize_threads') or 'in line'} | "
                  f"{r['docs_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                  f"{r['docs_per_s'] / base.get((r['model'], r['batch'], r['tokenize_threads']), float('nan')):.2f}x | {r['min_cosine_vs_fp32']:.5f} | "
                  f"{r['peak_gpu_mb']:.0f} |" for r in enc]
        lines.append("")
    rr = [r for r in rows if r["section"] == "rerank"]
    if rr:
        base = {r["batch"]: r["pairs_per_s"] for r in rr if r["precision"] == "fp32"}
        lines += ["| rerank (MiniLM cross-encoder) | batch | precision | pairs/s | vs fp32 | Pearson r vs fp32 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| RerankStage | {r['batch']} | {r['precision']} | {r['pairs_per_s']:.0f} | "
                  f"{r['pairs_per_s'] / base[r['batch']]:.2f}x | {r['pearson_vs_fp32']:.5f} |" for r in rr]
        lines.append("")
    for r in rows:
        if r["section"] == "auto":
            d = r["decision"]
            lines.append(f"- auto ({r['model']}, {r['role']}): chose **{d['chosen']}**; speedups vs fp32 "
                         f"{d['speedup_vs_fp32']}, quality {({k: round(v, 5) for k, v in d['quality'].items()})}")
    tr = [r for r in rows if r["section"] == "train"]
    if tr:
        lines += ["", "| train_loop (MiniLM, InfoNCE, world size 1) | batch | samples/s | final loss | peak GPU MiB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['precision']} | {r['batch']} | {r['samples_per_s']:.0f} | {r['final_loss']:.4f} | "
                  f"{(r['peak_gpu_mb'] or 0):.0f} |" for r in tr]
    ll = [r for r in rows if r["section"] == "llm"]
    if ll:
        lines += ["", f"| train_loop, DeepSpeed ZeRO-2 bf16 + LoRA r16, Qwen2 {ll[0]['params_m']:.0f}M (world size 1) "
                      "| batch | samples/s | tokens/s | final loss | peak GPU MiB |", "|---|---|---|---|---|---|"]
        lines += [f"| q 64 + d 256 tokens max, {r['tokens_per_record']:.0f} per record | {r['batch']} | "
                  f"{r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['final_loss']:.4f} | {r['peak_gpu_mb']:.0f} |"
                  for r in ll]
    for r in rows:
        if r["section"] == "resume":
            lines += ["", f"- resume at step 2 of 4 (dropout on), max |weight difference| to the uninterrupted run: "
                          f"resumed {r['resumed_vs_uninterrupted']:.3g}, resumed without the CUDA RNG "
                          f"{r['resumed_without_cuda_rng_vs_uninterrupted']:.3g}, a second uninterrupted run "
                          f"{r['uninterrupted_vs_uninterrupted']:.3g}"]
    for r in rows:
        if r["section"] == "error":
            lines.append(f"- {r['part']} FAILED: {r['error']}")
    return "\n".join(lines) + "\n"


def run(pack_dir: Path, out: Path, runs: int, docs: int, sections: list[str], args_steps: int = 30,
        train_batch: int = 128, llm_batches: tuple[int, ...] = (32, 128), llm_shape: dict | None = None) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (--device cpu for a dry run)")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else platform.processor() or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(env), flush=True)
    texts = json.loads((pack_dir / "texts.json").read_text())
    documents = texts["documents"][:docs]
    minilm = fp32_model(pack_dir, work)
    rows: list[dict] = []
    parts = {
        "encode": lambda: encode_section("all-MiniLM-L6-v2", minilm, documents, ENCODE_BATCHES, runs),
        "encode_base": lambda: encode_section("bert-base-shaped", base_sized_model(minilm, work), documents,
                                              [128, 512], runs, inline=("fp16",)),
        "rerank": lambda: rerank_section(minilm, work, texts["queries"], documents, [32, 128, 512], runs),
        "train": lambda: train_section(minilm, pack_dir / "train.jsonl", work, steps=args_steps, batch=train_batch),
        "llm": lambda: llm_section(minilm, pack_dir / "train.jsonl", work, steps=max(6, args_steps // 2),
                                   batches=list(llm_batches), shape=llm_shape or LLM_SHAPE),
    }
    for name in sections:
        t0 = time.perf_counter()
        try:
            rows += parts[name]()
        except Exception as e:  # one broken part must not hide the others' numbers
            traceback.print_exc()
            rows.append({"section": "error", "part": name, "error": f"{type(e).__name__}: {e}"})
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    md = markdown(env, rows)
    (out / "gpu_check.md").write_text(md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", type=Path, default=Path(".gpu_pack"))
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IR_DATA_DIR", "data")) / "scifact")
    p.add_argument("--docs", type=int, default=4096)
    r = sub.add_parser("run")
    r.add_argument("--pack", type=Path, default=Path(".gpu_pack"))
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_check")))
    r.add_argument("--runs", type=int, default=3)
    r.add_argument("--docs", type=int, default=4096)
    r.add_argument("--sections", default="encode,encode_base,rerank,train,llm")
    r.add_argument("--device", default="cuda", help="cpu: a dry run of the code paths (tiny --docs)")
    r.add_argument("--train-steps", type=int, default=30)
    r.add_argument("--train-batch", type=int, default=128)
    r.add_argument("--llm-batches", default="32,128")
    r.add_argument("--precisions", default="", help="encode/rerank: only these, e.g. fp16,bf16")
    r.add_argument("--encode-batches", default="32,128,512")
    r.add_argument("--tokenize-threads", default="", help="encode: tokenising threads to measure, e.g. 1,4,8 "
                   "(default: Embedder's own choice)")
    r.add_argument("--llm-shape", default="", help="hidden,layers,heads,kv_heads,intermediate,vocab (default Qwen2-0.5B's)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = getattr(args, "device", DEVICE)
    if getattr(args, "precisions", ""):
        PRECISIONS[:] = args.precisions.split(",")
    if getattr(args, "encode_batches", ""):
        ENCODE_BATCHES[:] = [int(b) for b in args.encode_batches.split(",")]
    if getattr(args, "tokenize_threads", ""):
        TOKENIZE_THREADS[:] = [int(t) for t in args.tokenize_threads.split(",")]
    if args.cmd == "pack":
        pack(args.out, args.data, args.docs)
    else:
        shape = dict(zip(LLM_SHAPE, map(int, args.llm_shape.split(",")))) if args.llm_shape else None
        run(args.pack, args.out, args.runs, args.docs, args.sections.split(","), args.train_steps,
            args.train_batch, tuple(int(b) for b in args.llm_batches.split(",")), shape)


if __name__ == "__main__":
    main()
