"""Autoscaling from zero: Ray's fake multi-node autoscaler launches the nodes the encode actors ask for.

The test writes its own cluster YAML (``provider: type: fake_multinode``; a head with 1 CPU and no
worker nodes; a worker node type that carries the ``encoder`` resource) and starts the head with
``RAY_FAKE_CLUSTER=1 ray start --head`` in a session of its own, with its own ``--temp-dir`` and
ports. It stops only that cluster: every process of that session's process group (the head's and
the fake nodes' the autoscaler started). Never ``ray stop``: it kills every cluster on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distributed_ir.index.storage import Location

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RESOURCE = "encoder"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_config(gcs_address: str) -> dict:
    """A fake_multinode cluster: no worker nodes at start, up to 2 ``encoder`` nodes on demand."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter",
             "cluster_synced_files")
    return {
        "cluster_name": "dir-autoscale-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "encoder_node": {"resources": {"CPU": 1, RESOURCE: 1, "object_store_memory": 100 * 2**20},
                             "node_config": {}, "min_workers": 0, "max_workers": 2}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty}}


def _stop_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, the cluster's process group (never this test's own group)."""
    if pgid == os.getpgrp():
        raise RuntimeError("refusing to signal the test's own process group")
    for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def fake_autoscaling_cluster():
    """The head of a fake multi-node autoscaling cluster; yields (address, head node id)."""
    import ray
    from ray._private.services import get_node_ip_address

    tmp = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")
    ip = get_node_ip_address()
    port, *others = _free_ports(10)
    cfg = Path(tmp) / "cluster.yaml"
    cfg.write_text(json.dumps(cluster_config(f"{ip}:{port}")))  # JSON is YAML
    names = ("node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    flags = [x for name, p in zip(names, others) for x in (f"--{name}", str(p))]
    # RAY_TMPDIR: the fake nodes the autoscaler starts (its monitor inherits this environment) put
    # their files here too. Token auth as every local cluster here (train.launch.init_ray): a driver
    # process that already ran a token-auth session keeps that mode cached, and against a cluster
    # with auth off the GCS's calls to it as the actors' owner fail, so every new actor dies at
    # once ("all references to the actor were removed"; seen after test_fault_tolerance).
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    from ray._private.authentication import authentication_token_setup as auth

    if not auth._get_default_token_path().is_file():  # `ray start` does not create it; `ray.init` would
        auth.generate_and_save_token()
    ray_cli = str(Path(sys.executable).parent / "ray")
    start = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--autoscaling-config", str(cfg),
                            "--temp-dir", tmp, "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
                            "--include-dashboard", "false", "--min-worker-port", "0", "--max-worker-port", "0", *flags],
                           env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    # `ray start` ran as the leader of a new session: the head's daemons (and the fake nodes its
    # autoscaler starts) are in that process group, and nothing else is.
    pgid = _group_of(tmp)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        saved = os.environ.get("RAY_AUTH_MODE")
        auth._enable_token_auth()  # RAY_AUTH_MODE=token and Ray's cached config refreshed, as ray.init does
        ray.init(address=f"{ip}:{port}")
        try:
            yield f"{ip}:{port}", ray.get_runtime_context().get_node_id()
        finally:
            ray.shutdown()
            if saved is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved
            auth.Config.initialize("")
    finally:
        if pgid:
            _stop_group(pgid)
        shutil.rmtree(tmp, ignore_errors=True)


def _group_of(tmp: str) -> int | None:
    """The process group of the processes whose command line names ``tmp`` (the head's daemons)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if tmp.encode() in (proc / "cmdline").read_bytes():
                return os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return None


def test_index_makes_the_autoscaler_launch_encoder_nodes(fake_autoscaling_cluster, tiny_bert, tmp_path, monkeypatch):
    """No node has ``encoder`` at start; the encode pool (1..2 actors) asks for it; the autoscaler
    launches an encoder node for the first actor and, as the busy pool grows, a second one; the job
    completes with every shard written on a launched node, each id once."""
    import pyarrow.parquet as pq
    import ray

    from distributed_ir.index import pipeline
    from distributed_ir.index.encode import SLOW_BATCH_S
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
