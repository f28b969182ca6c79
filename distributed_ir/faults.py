"""Opt-in fault injection and batch tracing (tests and drills only): the one module that reads
the drill environment variables.

Every drill is off unless its variable is set; each hook below returns at once otherwise.  Ray
Train workers and Ray Data actors do not inherit the driver's environment: :func:`forwarded_env`
hands each kind of process the variables it reads (for its ``runtime_env``).

==============================  ==============  ===============================================
variable                        read by         effect
==============================  ==============  ===============================================
``DIR_FAULT_KILL=RANK:STEP``    train worker    :func:`maybe_kill`: worker ``RANK`` sends itself
                                                SIGKILL right after optimizer step ``STEP``
                                                (before that step's checkpoint), like a node
                                                dying.  Needs ``DIR_FAULT_MARKER``.
``DIR_FAIL_ENCODE_AT_BATCH=N``  encode actor    :func:`before_encode_batch`: the actor exits
                                                abruptly (``os._exit(1)``) on its Nth batch.
                                                Needs ``DIR_FAULT_MARKER``.
``DIR_FAULT_MARKER=PATH``       train worker,   created (atomically) just before a kill or an
                                encode actor    actor death: only the first process to get
                                                there dies, so the restored run or the retried
                                                batch does not die again.
``DIR_SLOW_ENCODE_BATCH_S=S``   encode actor    :func:`before_encode_batch`: every batch sleeps
                                                S seconds first, so shards are still in flight
                                                when a drill removes a node.
``DIR_FAIL_AFTER_SHARDS=N``     index driver    :func:`after_shard_recorded`: the indexing job
                                                exits (status 17) once N shards are in its
                                                manifest, like a killed job (resume drills).
``DIR_TRACE_BATCHES=PATH``      train worker    :func:`trace_batch`: each rank appends one JSON
                                                line per consumed micro-batch to
                                                ``PATH.rank<R>`` (see below).
``DIR_FAULT_HOLD=STEP[,...]``   train worker    :func:`maybe_hold`: after optimizer step STEP
``DIR_FAULT_HOLD_DIR=DIR``                      (and its checkpoint or report) each rank writes
                                                ``DIR/held-STEP-rank<R>`` and waits until
                                                ``DIR/release-STEP`` exists.  A drill parks the
                                                run there to remove or add a node at a known
                                                point (Ray Train's resize then ends the waiting
                                                workers).
==============================  ==============  ===============================================

A trace line is ``{"pid", "attempt", "world_size", "rank", "epoch", "micro", "step", "t",
"queries"}`` where ``step`` is the optimizer step the micro-batch feeds and ``attempt`` names one
start of the worker group (rank 0 draws it, every rank shares it; attempts sort by start time).
:func:`read_trace` and :func:`surviving` let a test check that, counting only steps that survived
a restore or resize, no record is skipped or seen twice within an epoch.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

KILL = "DIR_FAULT_KILL"
MARKER = "DIR_FAULT_MARKER"
TRACE = "DIR_TRACE_BATCHES"
HOLD = "DIR_FAULT_HOLD"
HOLD_DIR = "DIR_FAULT_HOLD_DIR"
FAIL_AT_BATCH = "DIR_FAIL_ENCODE_AT_BATCH"
SLOW_BATCH_S = "DIR_SLOW_ENCODE_BATCH_S"
FAIL_AFTER_SHARDS = "DIR_FAIL_AFTER_SHARDS"

TRAIN_WORKER = "train worker"
ENCODE_ACTOR = "encode actor"
INDEX_DRIVER = "index driver"

# Every drill variable and the processes that read it (the table above).
DRILLS: dict[str, frozenset[str]] = {
    KILL: frozenset({TRAIN_WORKER}),
    FAIL_AT_BATCH: frozenset({ENCODE_ACTOR}),
    MARKER: frozenset({TRAIN_WORKER, ENCODE_ACTOR}),
    SLOW_BATCH_S: frozenset({ENCODE_ACTOR}),
    FAIL_AFTER_SHARDS: frozenset({INDEX_DRIVER}),
    TRACE: frozenset({TRAIN_WORKER}),
    HOLD: frozenset({TRAIN_WORKER}),
    HOLD_DIR: frozenset({TRAIN_WORKER}),
}


def _get(name: str) -> str:
    """A drill variable's value ('' when unset): the one read of the environment."""
    assert name in DRILLS, name
    return os.environ.get(name, "")


def forwarded_env(reader: str) -> dict[str, str]:
    """The drill variables set in this (driver) process that ``reader`` (:data:`TRAIN_WORKER` or
    :data:`ENCODE_ACTOR`) reads, for its ``runtime_env``'s ``env_vars``."""
    return {k: _get(k) for k, readers in DRILLS.items() if reader in readers and _get(k)}


def _claim_marker(trigger: str, note: str) -> bool:
    """Create ``$DIR_FAULT_MARKER`` holding ``note``; False when it exists (the drill already fired).

    Atomic (``O_EXCL``): of several processes reaching the fault, one dies, once."""
    marker = _get(MARKER)
    if not marker:
        raise RuntimeError(f"{trigger} is set without {MARKER}: the restarted process would die again")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, note.encode())
    os.close(fd)
    return True


# ---------------------------------------------------------------- training workers
def attempt_id(rank: int, world_size: int) -> str | None:
    """One id per start of the worker group, shared by its ranks (None unless tracing).

    ``<start time>-<random>``: sorting ids sorts attempts by start.  Rank 0 draws it and
    broadcasts it (a collective: every rank calls this at the same point of setup)."""
    if not _get(TRACE):
        return None
    ident = [f"{time.time():.6f}-{uuid.uuid4().hex[:8]}" if rank == 0 else None]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(ident, src=0)
    return ident[0]


def trace_batch(rank: int, epoch: int, micro: int, step: int, queries: list[str], attempt: str | None = None,
                world_size: int = 1) -> None:
    """Record one consumed micro-batch (no-op unless ``DIR_TRACE_BATCHES`` is set)."""
    path = _get(TRACE)
    if not path:
        return
    entry = {"pid": os.getpid(), "attempt": attempt or str(os.getpid()), "world_size": world_size, "rank": rank,
             "epoch": epoch, "micro": micro, "step": step, "t": time.time(), "queries": queries}
    with open(f"{path}.rank{rank}", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def maybe_kill(rank: int, step: int) -> None:
    """SIGKILL this worker once at the configured (rank, step) (no-op unless ``DIR_FAULT_KILL``)."""
    spec = _get(KILL)
    if not spec:
        return
    want_rank, want_step = (int(x) for x in spec.split(":"))
    if (rank, step) != (want_rank, want_step):
        return
    if _claim_marker(KILL, f"killed rank {rank} pid {os.getpid()} after step {step}\n"):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_hold(rank: int, step: int) -> None:
    """Park this worker after ``step`` until the drill releases it (no-op unless ``DIR_FAULT_HOLD``)."""
    spec = _get(HOLD)
    if not spec or step not in {int(x) for x in spec.split(",") if x}:
        return
    if not _get(HOLD_DIR):
        raise RuntimeError(f"{HOLD} is set without {HOLD_DIR}: nowhere to wait for the release")
    folder = Path(_get(HOLD_DIR))
    (folder / f"held-{step}-rank{rank}").write_text(str(os.getpid()))
    while not (folder / f"release-{step}").exists():
        time.sleep(0.2)


# ---------------------------------------------------------------- indexing
def before_encode_batch(calls: int) -> None:
    """An encode actor's hook before its ``calls``-th batch: sleep ``$DIR_SLOW_ENCODE_BATCH_S``
    when set, then exit this process abruptly on batch ``$DIR_FAIL_ENCODE_AT_BATCH``, once per
    marker file."""
    if _get(SLOW_BATCH_S):
        time.sleep(float(_get(SLOW_BATCH_S)))
    at = _get(FAIL_AT_BATCH)
    if not at or calls != int(at):
        return
    if _claim_marker(FAIL_AT_BATCH, f"encode actor pid {os.getpid()} died on batch {calls}\n"):
        os._exit(1)


def after_shard_recorded(recorded: int) -> None:
    """The index driver's hook after ``recorded`` shards of this run reached the manifest: exit
    (status 17, no cleanup) once ``$DIR_FAIL_AFTER_SHARDS`` have."""
    limit = int(_get(FAIL_AFTER_SHARDS) or 0)
    if limit and recorded >= limit:
        os._exit(17)


# ---------------------------------------------------------------- reading a trace
def read_trace(path: str | Path) -> list[dict]:
    """Every traced micro-batch from all ranks' files (``PATH.rank*``), in file order per rank."""
    path = Path(path)
    entries = []
    for f in sorted(path.parent.glob(path.name + ".rank*")):
        entries.extend(json.loads(line) for line in f.read_text().splitlines() if line)
    return entries


def surviving(entries: list[dict]) -> list[dict]:
    """Drop micro-batches whose optimizer step was undone by a restore or a resize.

    Every start of the worker group is one attempt (its ranks share the ``attempt`` id, ids sort
    by start time); an attempt whose first traced step is s undoes the earlier attempts' entries
    for steps >= s (they are replayed), whatever world size either ran at.
    """
    first_step: dict[str, int] = {}
    for e in entries:
        first_step[e["attempt"]] = min(first_step.get(e["attempt"], e["step"]), e["step"])
    order = sorted(first_step)
    keep = []
    for e in entries:
        later = order[order.index(e["attempt"]) + 1:]
        if all(e["step"] < first_step[a] for a in later):
            keep.append(e)
    return keep
