"""Scale-out corpus path: worker-written shards, index parts, URIs, a simulated multi-node cluster.

The parts tests run FAISS in this process (``remote=False``); the cluster tests share one
``ray.cluster_utils.Cluster`` (a head with no CPUs for work and two worker nodes that carry the
custom resource the encode actors ask for), so they live in a module of their own. The S3 test
writes to a moto server on 127.0.0.1; the cluster's nodes get its (fake) credentials the way a
real cluster's nodes do, from their environment.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from distributed_ir.eval.metrics import rank, read_run
from distributed_ir.index.actors import ActorStartTimeout, actor_plan
from distributed_ir.index.parts import build_parts, load_sharded, search_parts
from distributed_ir.index.shards import write_shard
from distributed_ir.index.storage import Location
from tests.conftest import free_ports


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
    loaded = load_sharded(tmp_path / "idx" / "index")
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


# Fake credentials for the moto S3 server; never real ones (region given: no lookups).
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def test_actor_plan_requests_min_max_and_needs_no_resource_present():
    """Pools ask for min..max actors and their resources; nothing is read from a cluster that has no
    GPU yet (no Ray is running here: a plan that looked would fail)."""
    gpu = actor_plan(use_gpu=True, min_actors=1, max_actors=4, units=6, resources={"encoder": 1})
    assert (gpu.min_size, gpu.max_size, gpu.num_gpus, gpu.device) == (1, 4, 1, "cuda")
    assert gpu.request() == {"CPU": 1, "GPU": 1, "encoder": 1.0}
    assert gpu.missing({"CPU": 8, "encoder": 2}) == {"GPU": 1}
    auto = actor_plan(units=5, cluster_cpus=2)  # default: 1 .. one per unit of work
    assert (auto.min_size, auto.max_size, auto.num_cpus, auto.threads) == (1, 5, 0.5, 1)
    fixed = actor_plan(actors=3, units=10, cluster_cpus=12)
    assert (fixed.min_size, fixed.max_size, fixed.threads) == (3, 3, 4)
    assert (actor_plan(min_actors=4, max_actors=9, units=6, cluster_cpus=2).min_size,
            actor_plan(min_actors=4, max_actors=9, units=6, cluster_cpus=2).max_size) == (4, 6)
    strategy = actor_plan(min_actors=2, max_actors=7, cluster_cpus=2).map_kwargs()["compute"]
    assert (strategy.min_size, strategy.max_size) == (2, 7)
    with pytest.raises(ValueError, match="min actors 5 > max actors 2"):
        actor_plan(min_actors=5, max_actors=2, cluster_cpus=2)
    from distributed_ir.index.pipeline import IndexOptions, encode_plan  # the index command's options

    plan = encode_plan(IndexOptions(use_gpu=True, max_actors=3, actor_resources={"encoder": 1}), 6)
    assert (plan.max_size, plan.min_size, plan.num_gpus, plan.device) == (3, 1, 1, "cuda")


def test_index_inputs_checked_before_any_cluster(tiny_bert, tmp_path, monkeypatch, capsys):
    """A missing corpus file, model folder or an output that is a file: reported with its path, and
    no Ray cluster is started or joined."""
    from distributed_ir import cli
    from distributed_ir.train import launch

    def no_cluster(*a, **k):
        raise AssertionError("a Ray cluster was started before the inputs were checked")

    monkeypatch.setattr(launch, "init_ray", no_cluster)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "text": "x"}) + "\n")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    base = ["index", "--model", str(tiny_bert), "--corpus", str(corpus), "--out", str(tmp_path / "idx")]
    cases = [(["--corpus", str(tmp_path / "nope.jsonl")], f"{tmp_path / 'nope.jsonl'}: no corpus files"),
             (["--model", str(tmp_path / "no-model")], f"model '{tmp_path / 'no-model'}' is not a local folder"),
             (["--out", str(a_file)], f"{a_file}: is a file"),
             (["--out", "nosuchscheme://bucket/x"], "output location 'nosuchscheme://bucket/x'")]
    for extra, message in cases:
        t0 = time.perf_counter()
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err
        assert time.perf_counter() - t0 < 5
    queries = tmp_path / "queries.jsonl"
    assert cli.main(["search", "--index", str(tmp_path / "idx"), "--queries", str(queries), "--out",
                     str(tmp_path / "run.trec")]) == 2
    assert f"{queries}: file not found" in capsys.readouterr().err
    queries.write_text(json.dumps({"_id": "q1", "text": "x"}) + "\n")
    assert cli.main(["search", "--index", str(tmp_path / "idx"), "--queries", str(queries), "--out",
                     str(tmp_path / "run.trec")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head with no CPUs for work and two worker nodes with 1 CPU and one ``encoder`` each."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")
    # No node_ip_address: Ray 2.60 rewrites 127.0.0.1 to the machine's IP for the GCS address, and
    # a driver given the loopback head then dials an address nothing listens on (seen: a hang).
    common = {"temp_dir": tmp, "object_store_memory": 100 * 2**20, "env_vars": S3_ENV}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **common})
    workers = [cluster.add_node(num_cpus=1, resources={"encoder": 1}, **common) for _ in range(2)]
    ray.init(address=cluster.address)
    yield cluster, {w.node_id for w in workers}, common
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_index_on_two_worker_nodes_exact_and_driver_carries_no_data(two_node_cluster, tiny_bert, tmp_path,
                                                                    monkeypatch):
    from distributed_ir.index import parts, pipeline, shards
    from distributed_ir.models.embedder import Embedder

    _, worker_ids, _ = two_node_cluster
    n = 240
    corpus = _corpus(tmp_path / "corpus.jsonl", n)

    def refuse(*a, **k):
        raise AssertionError("the driver must not build a model or read vectors")

    # In this (driver) process only: Ray workers import the real functions.
    monkeypatch.setattr(Embedder, "__init__", refuse)
    for mod, name in ((shards, "iter_shard"), (shards, "read_shard"), (parts, "iter_shard"),
                      (pipeline, "read_shard")):
        monkeypatch.setattr(mod, name, refuse)
    out = f"file://{tmp_path}/idx"
    opts = pipeline.IndexOptions(model=str(tiny_bert), corpus=str(corpus), out=out, num_shards=6, batch_size=8,
                                 precision="fp32", actor_resources={"encoder": 1}, min_actors=2)
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
    assert index["ntotal"] == n and sorted(load_sharded(root / "index").doc_ids) == sorted(shard_ids)
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


def _corpus(path, n):
    path.write_text("".join(json.dumps({"_id": f"doc{i}", "text": f"text {i} " + "w " * (i % 11)}) + "\n"
                            for i in range(n)))
    return path


def _shard_ids(loc, manifest):
    return [d for e in manifest["shards"].values()
            for d in pq.read_table(loc.path(e["file"]), columns=["doc_id"], filesystem=loc.fs)
            .column("doc_id").to_pylist()]


@pytest.mark.ray
@pytest.mark.slow
def test_absent_resource_is_waited_for_then_named(two_node_cluster, tiny_bert, tmp_path):
    """Actors asking for a resource no node has yet wait (an autoscaler could add it) for the
    configured time, then fail naming the request; they do not fail at once."""
    from distributed_ir.index import pipeline

    opts = pipeline.IndexOptions(model=str(tiny_bert), corpus=str(_corpus(tmp_path / "c.jsonl", 20)),
                                 out=str(tmp_path / "idx"), num_shards=2, precision="fp32",
                                 actor_resources={"gpu_pool": 1}, actor_start_timeout_s=4)
    t0 = time.perf_counter()
    with pytest.raises(ActorStartTimeout, match=r"asking for .*'gpu_pool': 1\.0.* did not start within 4 s; "
                                                r"the cluster still does not have \{'gpu_pool': 1\.0\}"):
        pipeline.encode_corpus(opts, progress=False)
    assert 4 <= time.perf_counter() - t0 < 60


@pytest.mark.ray
@pytest.mark.slow
def test_worker_node_removed_mid_run_still_exactly_once(two_node_cluster, tiny_bert, tmp_path, monkeypatch):
    """A third encoder node joins, takes shards, and is removed while shards are in flight: the job
    finishes on the other nodes, every id is indexed once and the manifest matches the files."""
    from distributed_ir.faults import SLOW_BATCH_S
    from distributed_ir.index import pipeline
    from distributed_ir.index.shards import shard_is_valid

    cluster, _, common = two_node_cluster
    extra = cluster.add_node(num_cpus=1, resources={"encoder": 1}, **common)
    n, shards = 180, 9
    monkeypatch.setenv(SLOW_BATCH_S, "0.7")  # forwarded to the actors: shards stay in flight ~1.4 s each
    out = tmp_path / "idx"
    opts = pipeline.IndexOptions(model=str(tiny_bert), corpus=str(_corpus(tmp_path / "c.jsonl", n)), out=str(out),
                                 num_shards=shards, batch_size=5, precision="fp32", actor_resources={"encoder": 1},
                                 min_actors=3, actor_restarts=3)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(m=pipeline.encode_corpus(opts, progress=False)))
    job.start()
    deadline = time.time() + 240
    done_at_removal = -1
    while time.time() < deadline and job.is_alive():
        if (out / "manifest.json").is_file():
            shard_nodes = [e["node_id"] for e in json.loads((out / "manifest.json").read_text())["shards"].values()]
            if extra.node_id in shard_nodes:  # the extra node has done work and holds an actor: remove it now
                done_at_removal = len(shard_nodes)
                cluster.remove_node(extra, allow_graceful=False)
                break
        time.sleep(0.1)
    job.join(timeout=300)
    assert not job.is_alive() and "m" in result, "the index job did not finish after the node removal"
    assert 0 < done_at_removal < shards, done_at_removal  # removed mid-run, not before or after
    manifest = result["m"]
    loc = Location(out)
    assert sorted(_shard_ids(loc, manifest)) == sorted(f"doc{i}" for i in range(n))  # each id exactly once
    assert sorted(manifest["shards"], key=int) == [str(i) for i in range(shards)]
    assert all(shard_is_valid(out, e) for e in manifest["shards"].values())  # checksums match the files
    assert sum(e["count"] for e in manifest["shards"].values()) == manifest["num_docs"] == n
    finished = {f"embeddings/{f}" for f in loc.list("embeddings") if ".tmp-" not in f}
    assert finished == {e["file"] for e in manifest["shards"].values()}  # no file the manifest does not name
    index = pipeline.build_faiss(out, manifest, "Flat")
    assert index["ntotal"] == n and sorted(load_sharded(out / "index").doc_ids) == sorted(f"doc{i}" for i in range(n))


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port) with an empty bucket; ``s3://`` URI prefix to it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", **{
            "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}).create_bucket(Bucket="ir-test")
        yield port
    finally:
        server.stop()


@pytest.mark.ray
@pytest.mark.slow
def test_index_and_search_on_s3(two_node_cluster, s3_server, tiny_bert, tmp_path, monkeypatch):
    """Stage, embedding shards, manifest and FAISS parts go to s3:// (moto on 127.0.0.1, through
    pyarrow's S3FileSystem with endpoint_override); `distributed-ir search` then reads the index from
    there and ranks exactly as numpy does over the shard vectors stored in S3."""
    from distributed_ir import cli
    from distributed_ir.index import pipeline
    from distributed_ir.index.encode import EncodeStage
    from distributed_ir.index.shards import read_shard

    for k, v in S3_ENV.items():  # this (driver) process; the cluster's nodes got them at start
        monkeypatch.setenv(k, v)
    out = f"s3://ir-test/idx?endpoint_override=127.0.0.1:{s3_server}&scheme=http&region=us-east-1"
    n = 90
    opts = pipeline.IndexOptions(model=str(tiny_bert), corpus=str(_corpus(tmp_path / "c.jsonl", n)), out=out,
                                 num_shards=3, batch_size=8, precision="fp32", actor_resources={"encoder": 1})
    manifest = pipeline.encode_corpus(opts, progress=False)
    index = pipeline.build_faiss(out, manifest, "Flat", index_shards=2)
    assert index["ntotal"] == n and not (tmp_path / "idx").exists()
    loc = Location(out)
    assert sorted(_shard_ids(loc, manifest)) == sorted(f"doc{i}" for i in range(n))
    assert {"manifest.json"} <= set(loc.list()) and set(loc.child("index").list()) >= {"index.json"}
    queries = tmp_path / "queries.jsonl"
    texts = {f"q{i}": f"text {i * 7} w w" for i in range(6)}
    queries.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in texts.items()))
    assert cli.main(["search", "--index", out, "--queries", str(queries), "--out", str(tmp_path / "run.trec"),
                     "--top-k", "5", "--precision", "fp32"]) == 0
    got = {q: rank(hits) for q, hits in read_run(tmp_path / "run.trec").items()}
    ids, vecs = [], []
    for e in manifest["shards"].values():
        i, v = read_shard(loc, e)
        ids += i
        vecs.append(v)
    qvec = EncodeStage(str(tiny_bert), kind="query", precision="fp32", device="cpu").encode(list(texts.values()))
    assert got == dict(zip(texts, _brute(np.concatenate(vecs), ids, qvec, 5)))
