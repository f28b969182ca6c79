"""Driver memory vs corpus size for `distributed-ir index` + `search` (issue #13): peak RSS at N and 4N documents.

Each size runs in a fresh process (so one run's allocations cannot hide the next one's): the real
index path (``encode_corpus`` + ``build_faiss``: staging, worker-written shards, manifest, FAISS
parts in Ray tasks), then the real search path (``search_index``, what `distributed-ir search`
calls: queries encoded by Ray Data query actors, searched by per-part searcher actors, one per
index part when ``--index-shards`` > 1) on a local Ray cluster, with a tiny BERT built in code
whose output is 384-dim (hidden 384, MiniLM's tokenizer) so the vectors weigh what MiniLM's would.
``--layers 0`` keeps only the embeddings and the pooling (no transformer layer): the run then
measures the pipeline rather than the transformer (1 layer runs ~300 docs/s on 2 cores).
search_s is `search`'s own timing: it includes starting the query and searcher actors.

Reports per size: docs/s, driver peak RSS during index and during search, the largest single Ray
process's peak RSS in each phase and the vector set's size (no process should come near it as
the corpus grows), search seconds and QPS (top 10), the scratch folder's disk use after indexing,
and the 4N/N driver ratio (target <= 1.15). IVF factories train on a 100k-vector sample drawn
shard by shard (``train_quantizer``), so no process holds the vector set for training either.

    PYTHONPATH=. .venv/bin/python benchmarks/driver_memory.py --sizes 1000000,4000000 --layers 0 \
        --index-type IVF2048,Flat --num-shards 64 --index-shards 4 --queries 10000
    PYTHONPATH=. .venv/bin/python benchmarks/driver_memory.py --sizes 2000,8000 --num-shards 8 --layers 0 \
        --index-type IVF32,Flat --queries 500   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_1m import WORDS, build_model, make_corpus  # noqa: E402  (same corpus and model builder as the load test)


def build_model_384(path: Path, layers: int = 1) -> Path:
    """BERT with 384-dim output (the vector size of MiniLM and the issue's benchmark) and ``layers``
    transformer layers (0: embeddings + pooling only)."""
    return build_model(path, hidden=384, layers=layers, heads=6, intermediate=384)


def make_queries(path: Path, n: int, seed: int = 1) -> None:
    """``n`` BEIR queries (``_id``, ``text``) over the corpus's vocabulary."""
    import random

    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))}) + "\n")


def disk_mib(folder: Path) -> int:
    """Bytes under ``folder`` (corpus, staging, shards, index, Ray's spill files), in MiB."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return round(total / 2**20)


class PeakRss:
    """Peak RSS of this process, and the largest peak of any single descendant (Ray's workers)."""

    def __init__(self, every: float = 0.25):
        import psutil

        self.me, self.every = psutil.Process(), every
        self.driver = self.largest_child = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.me.memory_info().rss)
                for child in self.me.children(recursive=True):
                    try:
                        self.largest_child = max(self.largest_child, child.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_one(docs: int, args: argparse.Namespace) -> dict:
    import ray

    from distributed_ir.index.pipeline import IndexOptions, build_faiss, encode_corpus
    from distributed_ir.index.search import search_index
    from distributed_ir.index.searchers import searcher_groups

    work = Path(tempfile.mkdtemp(prefix="drvmem-", dir=args.tmp))
    try:
        make_corpus(work / "corpus.jsonl", docs)
        make_queries(work / "queries.jsonl", args.queries)
        model = build_model_384(work / "model", args.layers)
        ray.init(num_cpus=os.cpu_count(), object_store_memory=args.object_store_mb * 2**20,
                 include_dashboard=False, _temp_dir=str(work / "ray"))
        opts = IndexOptions(model=str(model), corpus=str(work / "corpus.jsonl"), out=str(work / "idx"),
                            index_type=args.index_type, num_shards=args.num_shards, index_shards=args.index_shards,
                            batch_size=args.batch_size, precision="fp32")
        with PeakRss() as rss:
            t = time.perf_counter()
            manifest = encode_corpus(opts, progress=False)
            encode_s = time.perf_counter() - t
            t = time.perf_counter()
            index = build_faiss(opts.out, manifest, args.index_type, args.index_shards)
            faiss_s = time.perf_counter() - t
        disk = disk_mib(work)
        with PeakRss() as srss:  # `distributed-ir search`'s function, on the cluster already up
            run, summary = search_index(index_dir=opts.out, queries_path=work / "queries.jsonl",
                                        out=work / "run.trec", top_k=10, batch_size=args.query_batch_size,
                                        precision="fp32", progress=False)
        short = sum(len(hits) < min(10, docs) for hits in run.values())  # IVF: probed lists may hold fewer
        if len(run) != args.queries:
            raise RuntimeError(f"search returned {len(run)} of {args.queries} queries")
        del run
        ray.shutdown()
        return {"docs": docs, "dim": manifest["dim"], "indexed": index["ntotal"], "parts": index["shards"],
                "encode_s": round(encode_s, 1), "docs_per_s": round(docs / encode_s, 1),
                "faiss_build_s": round(faiss_s, 1),
                "driver_peak_rss_mib": round(rss.driver / 2**20),
                "largest_ray_process_mib": round(rss.largest_child / 2**20),
                "vectors_mib": round(docs * manifest["dim"] * 4 / 2**20), "disk_mib": disk,
                "writer_nodes": len(manifest["last_run"]["writer_nodes"]),
                "queries": summary["queries"], "searchers": len(searcher_groups(opts.out)),
                "search_s": summary["seconds"], "search_qps": summary["queries_per_s"], "under_10_hits": short,
                "search_driver_peak_rss_mib": round(srss.driver / 2**20),
                "search_largest_ray_process_mib": round(srss.largest_child / 2**20)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,400000", help="comma list; each runs in its own process")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--num-shards", type=int, default=32)
    ap.add_argument("--index-shards", type=int, default=4)
    ap.add_argument("--index-type", default="Flat", help="FAISS factory, e.g. IVF2048,Flat for millions of docs "
                                                         "(IVF trains on a 100k sample; nlist must be <= docs)")
    ap.add_argument("--layers", type=int, default=1, help="transformer layers of the 384-dim model (0: embeddings "
                                                          "+ pooling only, measures the pipeline)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--queries", type=int, default=10000, help="synthetic queries searched (top 10) per size")
    ap.add_argument("--query-batch-size", type=int, default=256)
    ap.add_argument("--object-store-mb", type=int, default=1500)
    ap.add_argument("--tmp", default="/tmp", help="scratch parent folder (corpus, index, Ray's temp/spill files)")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows = []
    forward = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("one", "sizes")]
    for n in (int(x) for x in args.sizes.split(",")):
        res = subprocess.run([sys.executable, __file__, "--one", str(n), *forward], capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"size {n} failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) >= 2:
        for phase, key in (("index", "driver_peak_rss_mib"), ("search", "search_driver_peak_rss_mib")):
            print(f"driver peak RSS ({phase}) {rows[-1]['docs']:,} / {rows[0]['docs']:,} docs: "
                  f"{rows[-1][key] / rows[0][key]:.3f}x (target <= 1.15)")
    scratch = Path(args.tmp).resolve()
    free = shutil.disk_usage(scratch).free
    print(f"scratch {scratch} ({free / 2**30:.0f} GiB free after the runs), object store {args.object_store_mb} MiB, "
          f"{os.cpu_count()} CPUs, {args.layers}-layer 384-dim model, index {args.index_type}, "
          f"{args.num_shards} embedding shards, {args.index_shards} index parts, {args.queries} queries top 10")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
