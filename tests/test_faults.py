"""The fault-injection module's contract, without Ray: which process gets which drill variable,
and that a drill fires once per marker file (each run in a fresh process, as the drills do)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distributed_ir import faults


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in faults.DRILLS}
    return subprocess.run([sys.executable, "-c", f"from distributed_ir import faults\n{code}"], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_each_process_kind_gets_only_the_drills_it_reads(monkeypatch):
    for name in faults.DRILLS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(faults.KILL, "1:5")
    monkeypatch.setenv(faults.MARKER, "/tmp/m")
    monkeypatch.setenv(faults.SLOW_BATCH_S, "0.5")
    monkeypatch.setenv(faults.FAIL_AFTER_SHARDS, "2")
    monkeypatch.setenv(faults.HOLD, "")  # set but empty: not forwarded
    assert faults.forwarded_env(faults.TRAIN_WORKER) == {faults.KILL: "1:5", faults.MARKER: "/tmp/m"}
    assert faults.forwarded_env(faults.ENCODE_ACTOR) == {faults.MARKER: "/tmp/m", faults.SLOW_BATCH_S: "0.5"}


def test_encode_actor_dies_on_its_nth_batch_once_per_marker(tmp_path):
    marker = tmp_path / "died"
    env = {faults.FAIL_AT_BATCH: "2", faults.MARKER: str(marker)}
    code = "for calls in (1, 2, 3):\n    faults.before_encode_batch(calls)\n    print(calls, flush=True)"
    first = _run(code, env)
    assert first.returncode == 1 and first.stdout.split() == ["1"]
    assert marker.read_text().startswith("encode actor pid")
    again = _run(code, env)  # the retried batch: the marker exists, nobody dies
    assert again.returncode == 0 and again.stdout.split() == ["1", "2", "3"], again.stderr


def test_kill_and_encode_drills_refuse_to_run_without_a_marker(monkeypatch):
    for name in faults.DRILLS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(faults.KILL, "0:3")
    faults.maybe_kill(0, 2)  # not the configured step: nothing happens
    with pytest.raises(RuntimeError, match=faults.MARKER):
        faults.maybe_kill(0, 3)
    monkeypatch.setenv(faults.FAIL_AT_BATCH, "1")
    with pytest.raises(RuntimeError, match=faults.MARKER):
        faults.before_encode_batch(1)


def test_index_driver_exits_17_once_enough_shards_are_recorded():
    code = "for n in (1, 2, 3):\n    faults.after_shard_recorded(n)\n    print(n, flush=True)"
    died = _run(code, {faults.FAIL_AFTER_SHARDS: "2"})
    assert died.returncode == 17 and died.stdout.split() == ["1"]
    assert _run(code, {faults.FAIL_AFTER_SHARDS: "0"}).stdout.split() == ["1", "2", "3"]
