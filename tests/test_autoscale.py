"""Autoscaling from zero: Ray's fake multi-node autoscaler launches the nodes the encode actors ask for.

The test writes its own cluster YAML (``provider: type: fake_multinode``; a head with 1 CPU and no
worker nodes; a worker node type that carries the ``encoder`` resource) and starts the head with
``RAY_FAKE_CLUSTER=1 ray start --head`` in a session of its own, with its own ``--temp-dir`` and
ports. It stops only that cluster: every process of that session's process group (the head's and
the fake nodes' the autoscaler started). Never ``ray stop``: it kills every cluster on the machine.
"""

from __future__ import annotations

import json
import time

import pytest

from distributed_ir.index.storage import Location
from tests.conftest import fake_autoscaling_cluster as fake_autoscaling_cluster_cm

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RESOURCE = "encoder"


@pytest.fixture(scope="module")
def fake_autoscaling_cluster():
    """No worker nodes at start; up to 2 nodes carrying the ``encoder`` resource, on demand."""
    with fake_autoscaling_cluster_cm("dir-autoscale-test", head_cpus=1, node_type="encoder_node",
                                     node_resources={"CPU": 1, RESOURCE: 1}) as cluster:
        yield cluster


def test_index_makes_the_autoscaler_launch_encoder_nodes(fake_autoscaling_cluster, tiny_bert, tmp_path, monkeypatch):
    """No node has ``encoder`` at start; the encode pool (1..2 actors) asks for it; the autoscaler
    launches an encoder node for the first actor and, as the busy pool grows, a second one; the job
    completes with every shard written on a launched node, each id once."""
    import pyarrow.parquet as pq
    import ray

    from distributed_ir.faults import SLOW_BATCH_S
    from distributed_ir.index import pipeline
    from distributed_ir.index.parts import load_sharded

    monkeypatch.setenv(SLOW_BATCH_S, "1.5")  # ~12 s of work for one actor: time for the pool to grow

    _, head_id = fake_autoscaling_cluster
    assert ray.cluster_resources().get(RESOURCE, 0) == 0 and len(ray.nodes()) == 1
    n = 120
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc{i}", "text": f"text {i} " + "w " * (i % 7)}) + "\n"
                              for i in range(n)))
    out = tmp_path / "idx"
    opts = pipeline.IndexOptions(model=str(tiny_bert), corpus=str(corpus), out=str(out), num_shards=8, batch_size=8,
                                 precision="fp32", actor_resources={RESOURCE: 1}, min_actors=1, max_actors=2,
                                 actor_start_timeout_s=240)
    t0 = time.perf_counter()
    manifest = pipeline.encode_corpus(opts, progress=False)
    seconds = time.perf_counter() - t0
    launched = {node["NodeID"] for node in ray.nodes() if node["Resources"].get(RESOURCE)}
    assert len(launched) == 2 and head_id not in launched  # the pool grew past its minimum: a second node
    writers = {e["node_id"] for e in manifest["shards"].values()}
    assert writers and writers <= launched, (writers, launched)
    ids = [d for e in manifest["shards"].values()
           for d in pq.read_table(Location(out).path(e["file"]), columns=["doc_id"]).column("doc_id").to_pylist()]
    assert sorted(ids) == sorted(f"doc{i}" for i in range(n))
    index = pipeline.build_faiss(out, manifest, "Flat")
    assert index["ntotal"] == n and sorted(load_sharded(out / "index").doc_ids) == sorted(ids)
    print(f"autoscaled encode: {len(launched)} node(s) launched, writers {len(writers)}, {seconds:.1f} s")
