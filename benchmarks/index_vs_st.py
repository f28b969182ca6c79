"""Whole commands, alternating: ``distributed-ir index`` (+ ``search``) vs a sentence-transformers fp32 script.

Per run, each side is a fresh process, timed from start to exit (model load, Ray start-up, staging,
FAISS included), on the same corpus, into a fresh output folder:

  index         ``distributed-ir index --model MODEL --corpus CORPUS --out DIR --precision P``
  index+search  the same, plus ``distributed-ir search`` over the qrels' queries
  st_script     ``benchmarks/st_encode_search.py``: SentenceTransformer.encode fp32 + FAISS search

The precision cache is a fresh folder unless ``--precision-cache`` names one: run 1 of ``index``
then pays ``auto``'s calibration and int8 export (cold), later runs reuse them (warm), as a user's
second index on the same host would.  Each run's nDCG@10 comes from the written TREC runs.

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/index_vs_st.py --runs 3
    # smoke: --docs 300 --queries 20 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _subset(dataset: Path, docs: int, queries: int, tmp: Path, split: str) -> tuple[Path, Path, Path]:
    """The corpus, queries and qrels to run on (the first N documents / judged queries for a smoke run)."""
    corpus, qfile, qrels = dataset / "corpus.jsonl", dataset / "queries.jsonl", dataset / "qrels" / f"{split}.tsv"
    if docs:
        with corpus.open() as src, (tmp / "corpus.jsonl").open("w") as dst:
            for i, line in enumerate(src):
                if i == docs:
                    break
                dst.write(line)
        corpus = tmp / "corpus.jsonl"
    if queries:
        lines = qrels.read_text().splitlines()
        kept, seen = [lines[0]], []
        for ln in lines[1:]:
            q = ln.split("\t")[0]
            if q not in seen:
                seen.append(q)
            if len(seen) > queries:
                break
            kept.append(ln)
        qrels = tmp / "qrels.tsv"
        qrels.write_text("\n".join(kept) + "\n")
    return corpus, qfile, qrels


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{out.stderr[-4000:]}")
    return seconds, out.stdout


def _ndcg(run: Path, qrels: Path) -> float:
    from distributed_ir.data.beir import load_qrels
    from distributed_ir.eval.metrics import evaluate, read_run

    return evaluate(read_run(run), load_qrels(qrels), ("ndcg@10",))["ndcg@10"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--dataset", default=str(Path(os.environ.get("IR_DATA_DIR", "data")) / "scifact"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--docs", type=int, default=0, help="first N documents only (smoke runs; 0 = all)")
    ap.add_argument("--queries", type=int, default=0, help="first N judged queries only (0 = all)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--precision-cache", default="", help="default: a fresh folder (run 1 of index is cold)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    from distributed_ir.models.embedder import resolve_model_path

    model = resolve_model_path(args.model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    tmp = Path(tempfile.mkdtemp(prefix="index-vs-st-"))
    cache = args.precision_cache or str(tmp / "precision-cache")
    corpus, queries, qrels = _subset(Path(args.dataset), args.docs, args.queries, tmp, args.split)
    cli = [sys.executable, "-m", "distributed_ir.cli"]
    prec = ["--precision", args.precision, "--precision-cache", cache]
    times: dict[str, list[float]] = {"index": [], "index+search": [], "st_script": []}
    ndcg: dict[str, list[float]] = {"index+search": [], "st_script": []}
    chosen: list[str] = []
    try:
        for r in range(args.runs):
            for side in (("ours", "st") if r % 2 == 0 else ("st", "ours")):
                out = tmp / f"{side}-{r}"
                if side == "ours":
                    t_index, stdout = _run([*cli, "index", "--model", model, "--corpus", str(corpus), "--out", str(out),
                                            "--batch-size", str(args.batch_size), *prec], env)
                    summary = json.loads(stdout[stdout.rindex("{\n"):])
                    chosen.append(f"{summary.get('precision')} ({summary.get('docs_per_s')} docs/s encode)")
                    t_search, _ = _run([*cli, "search", "--index", str(out), "--queries", str(queries), "--qrels",
                                        str(qrels), "--out", str(out / "run.trec"), *prec], env)
                    times["index"].append(t_index)
                    times["index+search"].append(t_index + t_search)
                    ndcg["index+search"].append(_ndcg(out / "run.trec", qrels))
                    print(f"run {r + 1} index {t_index:.1f} s + search {t_search:.1f} s; precision {chosen[-1]}; "
                          f"nDCG@10 {ndcg['index+search'][-1]:.4f}", flush=True)
                else:
                    out.mkdir()
                    t_st, _ = _run([sys.executable, str(REPO / "benchmarks" / "st_encode_search.py"), "--model", model,
                                    "--corpus", str(corpus), "--queries", str(queries), "--qrels", str(qrels),
                                    "--out", str(out / "run.trec"), "--batch-size", str(args.batch_size)], env)
                    times["st_script"].append(t_st)
                    ndcg["st_script"].append(_ndcg(out / "run.trec", qrels))
                    print(f"run {r + 1} st_script {t_st:.1f} s; nDCG@10 {ndcg['st_script'][-1]:.4f}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'all' if not args.docs else args.docs} documents of {args.dataset}, {os.cpu_count()} cores, "
          f"{args.runs} alternating runs, --precision {args.precision} (run 1 of index: cold precision cache)\n")
    print("| command | runs (s) | median (s) | st_script / command | nDCG@10 |\n|---|---|---|---|---|")
    for k, v in times.items():
        score = ndcg.get(k, ndcg["index+search"] if k == "index" else [])
        print(f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {med[k]:.1f} | {med['st_script'] / med[k]:.2f}x "
              f"| {', '.join(f'{x:.4f}' for x in score)} |")
    print(f"\nindex precision per run: {chosen}")


if __name__ == "__main__":
    main()
