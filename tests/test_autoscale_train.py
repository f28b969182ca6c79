"""Autoscaled training from zero worker nodes: Ray's fake multi-node autoscaler launches the nodes
an elastic ``[1, 2]`` training run asks for, the run completes, and the nodes go when idle.

The test writes its own cluster YAML (``provider: type: fake_multinode``; a head with no CPUs for
work; a 1-CPU worker node type, 0-2 nodes) and starts the head with ``RAY_FAKE_CLUSTER=1 ray start
--head`` in a session of its own, with its own ``--temp-dir`` and ports. It stops only that cluster:
the process group of that session (the head's daemons and the fake nodes its autoscaler started).
Never ``ray stop``: it kills every Ray cluster on the machine.
"""

from __future__ import annotations

import time

import pytest

from distributed_ir import faults
from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.data.records import write_records
from tests.conftest import fake_autoscaling_cluster, triplets

pytestmark = [pytest.mark.ray, pytest.mark.slow]

IDLE_TIMEOUT_MIN = 0.5  # launched nodes idle this long are removed


@pytest.fixture(scope="module")
def autoscaling_head():
    """No CPUs for work on the head; up to 2 one-CPU ``train_node``s on demand (Ray Train's workers),
    removed after IDLE_TIMEOUT_MIN idle; yields the head's node id."""
    with fake_autoscaling_cluster("dir-autoscale-train", head_cpus=0, node_type="train_node",
                                  node_resources={"CPU": 1}, idle_timeout_min=IDLE_TIMEOUT_MIN) as (_, head):
        yield head


def _worker_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def test_elastic_training_makes_the_autoscaler_launch_nodes_and_they_go_when_idle(autoscaling_head, tiny_bert,
                                                                                   tmp_path, monkeypatch):
    import ray

    from distributed_ir.train.launch import run_training

    assert _worker_nodes() == []  # nothing to train on yet: the run must ask for it
    write_records(tmp_path / "train.jsonl", triplets(32))
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
