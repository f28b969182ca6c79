"""Scale-out corpus path: worker-written shards, index parts, URIs, a simulated multi-node cluster.

The parts tests run FAISS in this process (``remote=False``); the cluster test starts its own
``ray.cluster_utils.Cluster`` (a head with no CPUs for work and two worker nodes that carry the
custom resource the encode actors ask for), so it lives in a module of its own.
"""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from distributed_ir.eval.metrics import rank
from distributed_ir.index.faiss_index import ShardedIndex
from distributed_ir.index.parts import build_parts, search_parts
from distributed_ir.index.shards import write_shard
from distributed_ir.index.storage import Location


def _unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(docs, ids, queries, k):
    """Top-k doc ids per query by numpy, ordered by the ranking rule."""
    scores = queries @ docs.T
    return [rank({ids[j]: float(row[j]) for j in np.argsort(-row)[:k]}) for row in scores]


def _write_shards(loc, vectors, ids, counts):
    entries, start = [], 0
    for i, n in enumerate(counts):
        entries.append(write_shard(loc, i, ids[start:start + n], vectors[start:start + n]))
        start += n
    return entries


@pytest.mark.parametrize("factory,parts", [("Flat", 3), ("IVF4,Flat", 2), ("HNSW16", 1)])
def test_index_parts_search_equals_brute_force(tmp_path, factory, parts):
    """Parts built shard file by shard file (IVF: quantizer trained on a sample, shared by every
    part; nprobe 16 >= 4 lists makes it exhaustive) and searched one at a time == numpy top-k."""
    docs, queries = _unit(700, 16, 0), _unit(25, 16, 1)
    ids = [f"d{i:04d}" for i in np.random.default_rng(2).permutation(700)]  # positions != id order
    loc = Location(f"file://{tmp_path}/idx")
    entries = _write_shards(loc, docs, ids, [150, 200, 100, 130, 120])
    meta = build_parts(loc, entries, factory, 16, num_parts=parts, remote=False, extra={"model": "m"})
    assert meta["ntotal"] == 700 and len(meta["parts"]) == parts
    assert [p["offset"] for p in meta["parts"]] == sorted(p["offset"] for p in meta["parts"])
    got = [rank(hits) for hits in search_parts(loc.child("index"), queries, 10)]
    expected = _brute(docs, ids, queries, 10)
    if factory == "HNSW16":  # approximate: a high recall, not equality
        assert np.mean([len(set(g) & set(e)) / 10 for g, e in zip(got, expected)]) >= 0.9
    else:
        assert got == expected
    # the in-memory loader (mining, LangChain) reads the same layout
    loaded = ShardedIndex.load(tmp_path / "idx" / "index")
    assert loaded.ntotal == 700 and sorted(loaded.doc_ids) == sorted(ids)


def test_ties_across_parts_are_cut_by_the_ranking_rule(tmp_path):
    """Identical vectors in different parts: the top-k keeps the highest doc ids, in rank order."""
    vec = np.tile(np.linspace(0.1, 1.0, 8, dtype=np.float32), (6, 1))
    ids = ["a3", "a0", "a5", "a1", "a4", "a2"]
    loc = Location(tmp_path / "idx")
    entries = _write_shards(loc, vec, ids, [2, 2, 2])
    build_parts(loc, entries, "Flat", 8, num_parts=3, remote=False)
    hits = search_parts(loc.child("index"), vec[:1], 4)[0]
    assert rank(hits) == ["a5", "a4", "a3", "a2"]


def test_object_store_layout_without_rename_and_paths_stay_inside(tmp_path):
    """pyarrow's mock filesystem stands in for s3/gs: no rename, files written in place."""
    loc = Location("mock:///bucket/idx")
    assert not loc.local
    docs = _unit(60, 8, 3)
    entries = _write_shards(loc, docs, [f"d{i}" for i in range(60)], [30, 30])
    build_parts(loc, entries, "Flat", 8, num_parts=2, remote=False)
    assert set(loc.child("index").list()) >= {"index.json"} and not any(".tmp" in n for n in loc.list("embeddings"))
    assert rank(search_parts(loc.child("index"), docs[7:8], 1)[0]) == ["d7"]
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="escapes"):
            loc.path(bad)


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head with no CPUs for work and two worker nodes with 1 CPU and one ``encoder`` each."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")
    # No node_ip_address: Ray 2.60 rewrites 127.0.0.1 to the machine's IP for the GCS address, and
    # a driver given the loopback head then dials an address nothing listens on (seen: a hang).
    common = {"temp_dir": tmp, "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **common})
    workers = [cluster.add_node(num_cpus=1, resources={"encoder": 1}, **common) for _ in range(2)]
    ray.init(address=cluster.address)
    yield cluster, {w.node_id for w in workers}
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_index_on_two_worker_nodes_exact_and_driver_carries_no_data(two_node_cluster, tiny_bert, tmp_path,
                                                                    monkeypatch):
    from distributed_ir.index import parts, pipeline, shards
    from distributed_ir.models.embedder import Embedder

    _, worker_ids = two_node_cluster
    n = 240
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc{i}", "text": f"text {i} " + "w " * (i % 11)}) + "\n"
                              for i in range(n)))

    def refuse(*a, **k):
        raise AssertionError("the driver must not build a model or read vectors")

    # In this (driver) process only: Ray workers import the real functions.
    monkeypatch.setattr(Embedder, "__init__", refuse)
    for mod, name in ((shards, "iter_shard"), (shards, "read_shard"), (parts, "iter_shard"),
                      (pipeline, "read_shard")):
        monkeypatch.setattr(mod, name, refuse)
    out = f"file://{tmp_path}/idx"
    opts = pipeline.IndexOptions(model=str(tiny_bert), corpus=str(corpus), out=out, num_shards=6, batch_size=8,
                                 precision="fp32", actor_resources={"encoder": 1})
    manifest = pipeline.encode_corpus(opts, progress=False)
    index = pipeline.build_faiss(out, manifest, "Flat", index_shards=2)
    monkeypatch.undo()

    writers = {e["node_id"] for e in manifest["shards"].values()}
    assert writers <= worker_ids and len(writers) == 2, (writers, worker_ids)  # both worker nodes wrote shards
    assert manifest["last_run"]["writer_nodes"] == sorted(writers)
    # every id exactly once: in the embedding shards and in the index parts
    root = tmp_path / "idx"
    shard_ids = [d for e in manifest["shards"].values()
                 for d in pq.read_table(root / e["file"], columns=["doc_id"]).column("doc_id").to_pylist()]
    assert sorted(shard_ids) == sorted(f"doc{i}" for i in range(n))
    assert index["ntotal"] == n and sorted(ShardedIndex.load(root / "index").doc_ids) == sorted(shard_ids)
    # search over the parts == numpy over the shard vectors
    ids, vecs = [], []
    for e in manifest["shards"].values():
        i, v = shards.read_shard(root, e)
        ids += i
        vecs.append(v)
    docs = np.concatenate(vecs)
    got = [rank(h) for h in search_parts(Location(out).child("index"), docs[:12], 5)]
    assert got == _brute(docs, ids, docs[:12], 5)
    # a rerun skips every shard (checksums and id digests verified by tasks on the workers)
    again = pipeline.encode_corpus(opts, progress=False)
    assert again["last_run"]["skipped_shards"] == 6 and again["last_run"]["encoded_docs"] == 0
