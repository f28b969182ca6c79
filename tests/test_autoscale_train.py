"""Autoscaled training from zero worker nodes: Ray's fake multi-node autoscaler launches the nodes
an elastic ``[1, 2]`` training run asks for, the run completes, and the nodes go when idle.

The test writes its own cluster YAML (``provider: type: fake_multinode``; a head with no CPUs for
work; a 1-CPU worker node type, 0-2 nodes) and starts the head with ``RAY_FAKE_CLUSTER=1 ray start
--head`` in a session of its own, with its own ``--temp-dir`` and ports. It stops only that cluster:
the process group of that session (the head's daemons and the fake nodes its autoscaler started).
Never ``ray stop``: it kills every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distributed_ir.config import TrainConfig, from_dict
from distributed_ir.data.records import write_records
from distributed_ir.train import faults
from tests.test_train_loop import _triplets

pytestmark = [pytest.mark.ray, pytest.mark.slow]

IDLE_TIMEOUT_MIN = 0.5  # launched nodes idle this long are removed


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_config(gcs_address: str) -> dict:
    """No worker nodes at start; up to 2 one-CPU ``train_node``s on demand (Ray Train's workers)."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter",
             "cluster_synced_files")
    return {
        "cluster_name": "dir-autoscale-train", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "train_node": {"resources": {"CPU": 1, "object_store_memory": 100 * 2**20}, "node_config": {},
                           "min_workers": 0, "max_workers": 2}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty}}


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
def autoscaling_head():
    """The head of a fake multi-node autoscaling cluster (no CPUs for work); yields its node id."""
    import ray
    from ray._private.services import get_node_ip_address

    tmp = tempfile.mkdtemp(prefix="ray-ast-", dir="/tmp")
    ip = get_node_ip_address()
    port, *others = _free_ports(9)
    cfg = Path(tmp) / "cluster.yaml"
    cfg.write_text(json.dumps(cluster_config(f"{ip}:{port}")))  # JSON is YAML
    names = ("node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    flags = [x for name, p in zip(names, others) for x in (f"--{name}", str(p))]
    # RAY_TMPDIR: the fake nodes (started by the autoscaler, which inherits this environment) put
    # their files here too; RAY_ADDRESS: Ray Train's placement-group cleaner asks this cluster's
    # State API, not "the latest" cluster on the machine. Auth off: a throw-away local cluster.
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": f"{ip}:{port}"}
    ray_cli = str(Path(sys.executable).parent / "ray")
    start = subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--autoscaling-config", str(cfg),
                            "--temp-dir", tmp, "--num-cpus", "0", "--object-store-memory", str(100 * 2**20),
                            "--include-dashboard", "false", "--min-worker-port", "0", "--max-worker-port", "0", *flags],
                           env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    pgid = _group_of(tmp)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        os.environ.update(RAY_AUTH_MODE="disabled", RAY_ADDRESS=f"{ip}:{port}")
        ray.init(address=f"{ip}:{port}")
        try:
            yield ray.get_runtime_context().get_node_id()
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if pgid:
            _stop_group(pgid)


def _worker_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def test_elastic_training_makes_the_autoscaler_launch_nodes_and_they_go_when_idle(autoscaling_head, tiny_bert,
                                                                                   tmp_path, monkeypatch):
    import ray

    from distributed_ir.train.launch import run_training

    assert _worker_nodes() == []  # nothing to train on yet: the run must ask for it
    write_records(tmp_path / "train.jsonl", _triplets(32))
    trace = tmp_path / "trace"
    monkeypatch.setenv(faults.TRACE, str(trace))
    cfg = from_dict(TrainConfig, {
        "train_path": str(tmp_path / "train.jsonl"), "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tiny_bert), "query_max_length": 16, "document_max_length": 24},
        "scaling": {"num_workers": [1, 2], "cpus_per_worker": 1, "torch_threads": 1, "resize_interval_s": 1},
        "optim": {"lr": 1e-3}, "batch_size": 4, "num_negatives": 1, "max_steps": 8, "log_every": 2,
        "checkpoint_every": 2, "max_failures": 2,
    })
    t0 = time.time()
    result = run_training(cfg)
    seconds = time.time() - t0
    assert result.metrics["step"] == 8 and (result.model_path / "modules.json").is_file()
    entries = faults.read_trace(trace)
    launched = [n["NodeID"] for n in ray.nodes() if n["NodeID"] != autoscaling_head]  # alive or gone
    assert launched, "the autoscaler launched no node"
    assert {e["world_size"] for e in entries} <= {1, 2} and entries
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]
    # idle nodes are removed (idle_timeout_minutes) once the run's resource request is cancelled
    deadline = time.time() + 240
    while _worker_nodes() and time.time() < deadline:
        time.sleep(2)
    assert _worker_nodes() == [], "launched nodes were not scaled down when idle"
    print(f"\n[autoscale] {len(launched)} node(s) launched, world sizes {sorted({e['world_size'] for e in entries})}, "
          f"training {seconds:.1f} s, scaled down {time.time() - t0 - seconds:.1f} s after the run")
