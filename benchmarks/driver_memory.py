"""Driver memory vs corpus size for `distributed-ir index` (issue #13): peak RSS at N and 4N documents.

Each size runs in a fresh process (so one run's allocations cannot hide the next one's): the real
index path (``encode_corpus`` + ``build_faiss``: staging, worker-written shards, manifest, FAISS
parts in Ray tasks) on a local Ray cluster, with a tiny BERT built in code whose output is 384-dim
(1 layer, hidden 384, MiniLM's tokenizer) so the vectors weigh what MiniLM's would.

Reports per size: docs/s, driver peak RSS, the largest single Ray process's peak RSS and the vector
set's size (no process should come near it as the corpus grows), and the 4N/N driver ratio
(target <= 1.15).

    PYTHONPATH=. .venv/bin/python benchmarks/driver_memory.py --sizes 100000,400000
    PYTHONPATH=. .venv/bin/python benchmarks/driver_memory.py --sizes 2000,8000 --num-shards 8   # smoke
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
from load_1m import build_model, make_corpus  # noqa: E402  (same corpus and model builder as the load test)


def build_model_384(path: Path) -> Path:
    """One-layer BERT with 384-dim output (the vector size of MiniLM and the issue's benchmark)."""
    return build_model(path, hidden=384, layers=1, heads=6, intermediate=384)


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

    work = Path(tempfile.mkdtemp(prefix="drvmem-", dir=args.tmp))
    try:
        make_corpus(work / "corpus.jsonl", docs)
        model = build_model_384(work / "model")
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
        ray.shutdown()
        return {"docs": docs, "dim": manifest["dim"], "indexed": index["ntotal"], "encode_s": round(encode_s, 1),
                "docs_per_s": round(docs / encode_s, 1), "faiss_build_s": round(faiss_s, 1),
                "driver_peak_rss_mib": round(rss.driver / 2**20), "largest_ray_process_mib": round(rss.largest_child / 2**20),
                "vectors_mib": round(docs * manifest["dim"] * 4 / 2**20),
                "writer_nodes": len(manifest["last_run"]["writer_nodes"])}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,400000", help="comma list; each runs in its own process")
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--num-shards", type=int, default=32)
    ap.add_argument("--index-shards", type=int, default=4)
    ap.add_argument("--index-type", default="Flat")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--object-store-mb", type=int, default=1500)
    ap.add_argument("--tmp", default="/tmp", help="scratch parent folder")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n), "--num-shards", str(args.num_shards),
               "--index-shards", str(args.index_shards), "--index-type", args.index_type,
               "--batch-size", str(args.batch_size), "--object-store-mb", str(args.object_store_mb), "--tmp", args.tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            sys.exit(f"size {n} failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[-1][7:]))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) >= 2:
        print(f"driver peak RSS {rows[-1]['docs']:,} / {rows[0]['docs']:,} docs: "
              f"{rows[-1]['driver_peak_rss_mib'] / rows[0]['driver_peak_rss_mib']:.3f}x (target <= 1.15)")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
