"""Elastic training: ``scaling.num_workers: [min, max]`` gives the fixed max-size run's result.

Unit part (no Ray): config parsing and the divisibility rule, the global micro-batches at every
world size, and the trace bookkeeping across resizes.  Cluster part: a simulated multi-node Ray
cluster (``ray.cluster_utils.Cluster``: a head without CPUs for work, two 1-CPU worker nodes) on
which an elastic [1, 2] run loses a worker node mid-run (continues with 1 worker from the last
checkpoint), gets a node back (grows to 2 again) and must end with the weights of the
uninterrupted fixed 2-worker run, having consumed every global micro-batch exactly once.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_ir import faults
from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import ConfigError, from_dict, load_config
from distributed_ir.data.records import write_records
from distributed_ir.train.batching import epoch_batches
from tests.conftest import free_ports, triplets

# ----------------------------------------------------------------------------- unit (no Ray)


def _release(holds: Path, steps: tuple[int, ...]) -> None:
    """Let the workers parked at ``steps`` (the DIR_FAULT_HOLD drill) go on."""
    for step in steps:
        (holds / f"release-{step}").write_text("")


def _joined(thread, result: dict) -> dict:
    """The background run's result, or its error raised here."""
    thread.join(timeout=300)
    if "error" in result:
        raise result["error"]
    return result["run"]


def test_num_workers_is_an_int_or_min_max(tmp_path):
    assert from_dict(TrainConfig, {"scaling": {"num_workers": 3}}).scaling.ray_num_workers() == 3
    cfg = load_config(TrainConfig, None, ["scaling.num_workers=[2, 4]", "batch_size=6", "max_failures=2"])
    assert cfg.scaling.elastic and cfg.scaling.ray_num_workers() == (2, 4)
    assert [cfg.worker_batch_size(w) for w in (2, 3, 4)] == [12, 8, 6]  # 24 records per micro-step
    assert from_dict(TrainConfig, {"scaling": {"num_workers": [2, 2]}}).scaling.num_workers == 2  # = fixed
    # a fixed run keeps batch_size per worker whatever the world size (backwards compatible)
    assert from_dict(TrainConfig, {"scaling": {"num_workers": 2}, "batch_size": 5}).worker_batch_size(1) == 5
    for bad in ([0, 2], [3, 2], [1, 2, 3], ["a", 2]):
        with pytest.raises(ConfigError) as err:
            from_dict(TrainConfig, {"scaling": {"num_workers": bad}, "max_failures": 1})
        assert err.value.key == "scaling.num_workers"


def test_global_batch_that_cannot_split_is_an_error_naming_the_key(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("max_failures: 1\nbatch_size: 5\nscaling:\n  num_workers: [2, 4]\n")
    with pytest.raises(ConfigError) as err:  # 20 records per micro-step do not split over 3 workers
        load_config(TrainConfig, f)
    assert err.value.key == "batch_size"
    assert f"{f}:2: field 'batch_size'" in str(err.value) and "over 3 worker(s)" in str(err.value)
    assert "batch_size=6" in str(err.value)  # the nearest batch_size that works: 24 = lcm(2, 3, 4) x 2
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"scaling": {"num_workers": [1, 2]}})
    assert err.value.key == "max_failures"  # a lost node must shrink the run, not end it
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"scaling": {"num_workers": [1, 2]}, "max_failures": 1,
                                "engine": {"name": "deepspeed", "zero_stage": 2}})
    assert err.value.key == "engine.zero_stage"


def test_every_world_size_trains_on_the_same_global_micro_batches():
    """Elastic [1, 4], batch 3: at 1, 2, 3 and 4 workers each global micro-step holds the same 12
    records in the same order, with the same hard negatives."""
    cfg = from_dict(TrainConfig, {"scaling": {"num_workers": [1, 4]}, "batch_size": 3, "max_failures": 1})
    recs = triplets(40)

    def global_steps(world: int, start: int = 0) -> list[tuple[list[str], list[str]]]:
        b = cfg.worker_batch_size(world)
        ranks = [list(epoch_batches(recs, 1, r, world, b, 1, seed=7, start_step=start)) for r in range(world)]
        return [(sum((x.queries for x in step), []), sum((x.negatives for x in step), []))
                for step in zip(*ranks)]

    one = global_steps(1)
    assert len(one) == 40 // 12 and len(one[0][0]) == 12
    for world in (2, 3, 4):
        assert global_steps(world) == one, f"{world} workers"
    assert global_steps(3, start=1) == one[1:]  # resuming at another size continues at the same record


def test_surviving_counts_each_step_once_across_resizes():
    """Attempt A (2 workers) runs steps 1-5, B (1 worker) resumes after step 4, C (2 workers)
    resumes after step 6: steps 1-4 from A, 5-6 from B, 7-8 from C survive."""
    def entries(attempt: str, world: int, steps: range) -> list[dict]:
        return [{"attempt": attempt, "rank": r, "step": s, "world_size": world} for s in steps for r in range(world)]

    trace = entries("1.0-a", 2, range(1, 6)) + entries("2.0-b", 1, range(5, 8)) + entries("3.0-c", 2, range(7, 9))
    kept = faults.surviving(trace)
    assert [(e["attempt"], e["step"]) for e in kept if e["rank"] == 0] == (
        [("1.0-a", s) for s in range(1, 5)] + [("2.0-b", 5), ("2.0-b", 6)] + [("3.0-c", 7), ("3.0-c", 8)])
    assert sorted(e["step"] for e in kept if e["rank"] == 1) == [1, 2, 3, 4, 7, 8]


# ----------------------------------------------------------------------------- simulated cluster


@pytest.fixture(scope="module")
def elastic_cluster():
    """A head with no CPUs for work (the Ray Train controller runs there) and two 1-CPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="ray-el-", dir="/tmp")
    port = free_ports(1)[0]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    with pytest.MonkeyPatch.context() as env:
        # Ray Train's placement-group cleaner asks the State API about the controller at the default
        # address; with other Ray clusters on this machine it would pick "the latest one". Every
        # process of this cluster inherits RAY_ADDRESS = this head, so it asks this cluster only.
        env.setenv("RAY_ADDRESS", address)
        # No node_ip_address: Ray 2.60 rewrites 127.0.0.1 to the machine's IP for the GCS address, and
        # a driver given the loopback head then dials an address nothing listens on (a hang).
        common = {"temp_dir": tmp, "object_store_memory": 100 * 2**20}
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 0, "include_dashboard": False, "gcs_server_port": port, **common})
        assert cluster.address == address, (cluster.address, address)
        nodes = [cluster.add_node(num_cpus=1, **common) for _ in range(2)]
        ray.init(address=cluster.address)
        yield cluster, nodes, common
        ray.shutdown()
        cluster.shutdown()


def _config(tmp_path: Path, model: Path, name: str, num_workers) -> TrainConfig:
    return from_dict(TrainConfig, {
        "train_path": str(tmp_path / "train.jsonl"), "output_dir": str(tmp_path / name / "out"),
        "model": {"name_or_path": str(model), "query_max_length": 16, "document_max_length": 24},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": 1, "torch_threads": 1, "resize_interval_s": 1},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.2}, "batch_size": 4, "num_negatives": 1, "seed": 11,
        "max_steps": 12, "log_every": 2, "checkpoint_every": 2, "max_failures": 3,
    })


def _wait(predicate, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


def _global_micro_batches(entries: list[dict]) -> dict[tuple[int, int], list[str]]:
    """(epoch, micro) -> the global micro-batch's queries, ranks concatenated in rank order."""
    out: dict[tuple[int, int], list[str]] = {}
    for e in sorted(entries, key=lambda e: (e["epoch"], e["micro"], e["rank"])):
        out.setdefault((e["epoch"], e["micro"]), []).extend(e["queries"])
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_elastic_run_that_loses_and_regains_a_node_equals_the_fixed_run(elastic_cluster, tiny_bert, tmp_path,
                                                                       monkeypatch):
    from distributed_ir.train.launch import run_training

    cluster, nodes, common = elastic_cluster
    records = triplets(48)  # 8 records per global micro-step: 6 steps per epoch, 12 steps = 2 epochs
    write_records(tmp_path / "train.jsonl", records)
    # a failed start (a reservation that still counts the lost node) is retried after this long
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")

    monkeypatch.setenv(faults.TRACE, str(tmp_path / "fixed" / "trace"))
    (tmp_path / "fixed").mkdir()
    fixed = run_training(_config(tmp_path, tiny_bert, "fixed", 2))
    fixed_trace = faults.read_trace(tmp_path / "fixed" / "trace")

    # elastic [1, 2]: park both workers after step 4 (its checkpoint reported), remove a node;
    # park the lone worker after step 8, add a node back; release once 2 workers train again
    holds = tmp_path / "holds"
    holds.mkdir()
    trace = tmp_path / "elastic" / "trace"
    trace.parent.mkdir()
    monkeypatch.setenv(faults.TRACE, str(trace))
    monkeypatch.setenv(faults.HOLD, "4,8")
    monkeypatch.setenv(faults.HOLD_DIR, str(holds))
    result: dict[str, object] = {}

    def train() -> None:  # in a thread: Cluster.add_node needs the main thread (signal handlers)
        try:
            result["run"] = run_training(_config(tmp_path, tiny_bert, "elastic", [1, 2]))
        except BaseException as e:  # re-raised below
            result["error"] = e
        finally:
            for step in (4, 8):  # never leave a worker parked
                (holds / f"release-{step}").write_text("")

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    events: dict[str, float] = {}

    def until(cond, what: str) -> None:  # cond(), or the run ended (an error is re-raised below)
        _wait(lambda: cond() or not thread.is_alive(), what)
        if not cond():
            raise AssertionError(f"training ended before {what}: {result.get('error')!r}")

    def regrown() -> bool:
        try:
            entries = faults.read_trace(trace)
        except ValueError:  # a line being appended right now: look again
            return False
        return any(e["world_size"] == 2 and e["t"] > events["node_added"] for e in entries)

    try:
        until(lambda: all((holds / f"held-4-rank{r}").exists() for r in (0, 1)), "2 workers parked at step 4")
        time.sleep(4)  # the controller polls the step-4 checkpoint in (every 2 s by default)
        events["node_lost"] = time.time()
        cluster.remove_node(nodes[1])
        until(lambda: (holds / "held-8-rank0").exists(), "1 worker parked at step 8")
        time.sleep(4)
        events["node_added"] = time.time()
        cluster.add_node(num_cpus=1, **common)
        until(regrown, "2 workers training again")
    finally:  # let the run finish (a regrown group that resumed before step 8 passes it)
        _release(holds, (4, 8))
    elastic = _joined(thread, result)
    entries = faults.read_trace(trace)

    # the world size really changed 2 -> 1 -> 2, each resize resuming from a checkpoint
    attempts = sorted({(e["attempt"], e["world_size"]) for e in entries})
    sizes = [w for _, w in attempts]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, attempts
    kept = faults.surviving(entries)
    assert {e["world_size"] for e in kept} == {1, 2}, "steps of both sizes are in the result"
    first = {a: min(e["step"] for e in entries if e["attempt"] == a) for a, _ in attempts}
    assert all(first[a] > 1 for a, _ in attempts[1:]), "every restart resumed from a checkpoint"
    history_sizes = {h["step"]: h["world_size"] for h in elastic.history}
    assert sorted(history_sizes) == list(range(2, 13, 2)) and set(history_sizes.values()) == {1, 2}
    lone = [e for e in kept if e["world_size"] == 1]
    assert all(len(e["queries"]) == 8 for e in lone)  # 1 worker takes the whole global micro-batch
    back = min(e["t"] for e in entries if e["world_size"] == 1)
    print(f"\n[elastic] node loss -> training again with 1 worker: {back - events['node_lost']:.1f} s; "
          f"node added -> 2 workers: "
          f"{min(e['t'] for e in entries if e['world_size'] == 2 and e['t'] > events['node_added']) - events['node_added']:.1f} s")

    # every global micro-batch exactly once, the same as the fixed run's, in the same order
    assert _global_micro_batches(kept) == _global_micro_batches(fixed_trace)
    index_of = {r.query: i for i, r in enumerate(records)}
    for epoch in (0, 1):
        seen = Counter(index_of[q] for e in kept if e["epoch"] == epoch for q in e["queries"])
        assert set(seen) == set(range(48)) and max(seen.values()) == 1, f"epoch {epoch}"

    # same final weights (float reassociation only: 1 worker sums what 2 workers all-reduce)
    assert elastic.metrics["step"] == fixed.metrics["step"] == 12
    w_fixed = load_file(fixed.model_path / "model.safetensors")
    w_elastic = load_file(elastic.model_path / "model.safetensors")
    worst = max(float((w_elastic[n] - v).abs().max()) for n, v in w_fixed.items())
    scale = max(float(v.abs().max()) for v in w_fixed.values())
    print(f"[elastic] max |weight difference| vs the fixed run: {worst:.2e} (largest |weight| {scale:.2f})")
    print("[elastic] loss by step, fixed vs elastic (world size): " + ", ".join(
        f"{a['step']}: {a['loss']:.5f} / {b['loss']:.5f} ({b['world_size']})"
        for a, b in zip(fixed.history, elastic.history)))
    for name, value in w_fixed.items():
        torch.testing.assert_close(w_elastic[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
@pytest.mark.slow
def test_preemption_notice_takes_a_just_in_time_checkpoint_and_the_restart_loses_nothing(
        elastic_cluster, tiny_bert, tmp_path, monkeypatch):
    """A worker node is drained for preemption (Ray Core's drain with a deadline, as a spot reclaim
    does) after step 2; periodic checkpoints come every 6 steps only, so the run restarts (with the
    one node left) from the just-in-time checkpoint of step 3, not from scratch."""
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    from distributed_ir.train.launch import run_training

    cluster, _, common = elastic_cluster
    while len(cluster.worker_nodes) < 2:  # the module's other test may have left one node
        cluster.add_node(num_cpus=1, **common)
    records = triplets(48)
    write_records(tmp_path / "train.jsonl", records)
    holds = tmp_path / "holds"
    holds.mkdir()
    trace = tmp_path / "trace"
    for key, value in {faults.TRACE: str(trace), faults.HOLD: "2,5", faults.HOLD_DIR: str(holds),
                       "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
                       "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}.items():
        monkeypatch.setenv(key, value)
    cfg = _config(tmp_path, tiny_bert, "preempted", [1, 2])
    cfg.checkpoint_every, cfg.log_every, cfg.max_steps = 6, 1, 8
    result: dict[str, object] = {}

    def train() -> None:
        try:
            result["run"] = run_training(cfg)
        except BaseException as e:  # re-raised below
            result["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()

    def until(cond, what: str) -> None:
        _wait(lambda: cond() or not thread.is_alive(), what)
        if not cond():
            raise AssertionError(f"training ended before {what}: {result.get('error')!r}")

    def entries() -> list[dict]:
        try:
            return faults.read_trace(trace)
        except ValueError:  # a line being appended
            return []

    try:
        until(lambda: all((holds / f"held-2-rank{r}").exists() for r in (0, 1)), "2 workers parked at step 2")
        doomed = next(iter(cluster.worker_nodes))  # either node hosts one of the 2 workers
        deadline = time.time() + 20
        accepted, why = GcsClient(address=cluster.address).drain_node(
            doomed.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "test: spot reclaim", int(deadline * 1000))
        assert accepted, why
        time.sleep(3)  # Ray Train's preemption watcher polls every 0.5 s here
        (holds / "release-2").write_text("")
        until(lambda: (holds / "held-5-rank0").exists(), "parked at step 5 after the notice")
        time.sleep(max(0.0, deadline - time.time()))
        cluster.remove_node(doomed)  # the reclaim: the node goes at its deadline
        until(lambda: any(e["world_size"] == 1 for e in entries()), "training again on the node left")
    finally:
        _release(holds, (2, 5))
    run = _joined(thread, result)
    got = faults.read_trace(trace)
    restarted = [e for e in got if e["world_size"] == 1]
    assert min(e["step"] for e in restarted) == 4, "resumed right after the just-in-time checkpoint of step 3"
    assert max(e["step"] for e in got if e["world_size"] == 2) >= 5  # steps 4-5 ran on 2 workers, were redone
    assert run.metrics["step"] == 8 and [h["world_size"] for h in run.history] == [2, 2, 2, 1, 1, 1, 1, 1]
    kept = faults.surviving(got)
    index_of = {r.query: i for i, r in enumerate(records)}
    seen = Counter(index_of[q] for e in kept if e["epoch"] == 0 for q in e["queries"])
    assert set(seen) == set(range(48)) and max(seen.values()) == 1  # epoch 0: every record once
