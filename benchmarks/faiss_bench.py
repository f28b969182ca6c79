"""FAISS index types on N x 384 clustered vectors: build time, QPS, recall@10 vs Flat, bytes/vector.

Data: a Gaussian mixture of unit-norm centres with noise, normalised (clustered like real
embeddings); queries drawn from the same mixture. Recall@10 is measured against exact Flat
search. QPS is the median of --repeats timed passes over all queries (batched search).

    .venv/bin/python benchmarks/faiss_bench.py --n 1000000 --queries 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def mixture(n: int, dim: int, centres: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # chunked to bound memory
        m = min(100_000, n - start)
        x = c[rng.integers(0, centres, m)] + noise * rng.standard_normal((m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def index_bytes(index) -> int:
    import faiss

    with tempfile.NamedTemporaryFile() as fh:
        faiss.write_index(index, fh.name)
        return os.path.getsize(fh.name)


def main() -> None:
    import faiss

    from distributed_ir.index.faiss_index import build_index, set_search_params

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.06)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--types", default="Flat;IVF4096,Flat;IVF4096,PQ48;HNSW32", help="';'-separated factories")
    args = p.parse_args()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    docs = mixture(args.n, args.dim, args.centres, args.noise, seed=0)
    rng = np.random.default_rng(1)
    queries = docs[rng.choice(args.n, args.queries, replace=False)] + 0.03 * rng.standard_normal(
        (args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"data: {args.n} x {args.dim} in {time.perf_counter() - t0:.1f}s; {args.queries} queries; "
          f"{os.cpu_count()} cores", flush=True)
    ids = np.arange(args.n, dtype=np.int64)
    types = args.types.split(";")
    truth = None
    rows = []
    for factory in types:
        t0 = time.perf_counter()
        index = build_index(docs, ids, factory, train_size=100_000, use_gpu=False)
        build = time.perf_counter() - t0
        settings = [None]
        if factory.startswith("IVF"):
            settings = [("nprobe", v) for v in (16, 32, 64)]
        elif "HNSW" in factory:
            settings = [("efSearch", v) for v in (64, 128, 256)]
        size = index_bytes(index)
        for setting in settings:
            if setting:
                kw = {"nprobe": setting[1]} if setting[0] == "nprobe" else {"hnsw_ef_search": setting[1]}
                set_search_params(index, **kw)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                _, got = index.search(queries, 10)
                times.append(time.perf_counter() - t)
            qps = args.queries / statistics.median(times)
            if truth is None:
                truth = got  # Flat runs first: exact top-10
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
            label = factory + (f" {setting[0]}={setting[1]}" if setting else "")
            rows.append((label, build, qps, recall, size / args.n))
            print(f"{label:<28} build {build:7.1f}s  QPS {qps:9.0f}  recall@10 {recall:.4f}  "
                  f"bytes/vec {size / args.n:7.1f}", flush=True)
        del index
    flat_qps = rows[0][2]
    print("\n| index | build s | QPS | x Flat QPS | recall@10 vs Flat | bytes/vector |\n|---|---|---|---|---|---|")
    for label, build, qps, recall, bpv in rows:
        print(f"| {label} | {build:.1f} | {qps:.0f} | {qps / flat_qps:.1f} | {recall:.4f} | {bpv:.1f} |")


if __name__ == "__main__":
    main()
