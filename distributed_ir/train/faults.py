"""Opt-in fault injection and batch tracing for the training loop (tests and drills only).

Both are off unless their environment variable is set; the loop calls two hooks that return at
once otherwise.  :func:`forwarded_env` hands these variables to Ray Train workers (whose
processes do not inherit the driver's environment).

- ``DIR_FAULT_KILL=RANK:STEP`` with ``DIR_FAULT_MARKER=PATH``: worker ``RANK`` sends itself
  SIGKILL right after optimizer step ``STEP`` (before that step's checkpoint), like a node
  dying.  The marker file is created first, so the restored run does not die again.
- ``DIR_TRACE_BATCHES=PATH``: each rank appends one JSON line per consumed micro-batch to
  ``PATH.rank<R>``: ``{"pid", "rank", "epoch", "micro", "step", "queries"}`` where ``step`` is
  the optimizer step the micro-batch feeds.  A test can then check that, counting only steps
  that survived a restore, no record is skipped or seen twice within an epoch.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

KILL = "DIR_FAULT_KILL"
MARKER = "DIR_FAULT_MARKER"
TRACE = "DIR_TRACE_BATCHES"


def forwarded_env() -> dict[str, str]:
    """The fault/trace variables set in this (driver) process, for ``worker_runtime_env``."""
    return {k: os.environ[k] for k in (KILL, MARKER, TRACE) if os.environ.get(k)}


def trace_batch(rank: int, epoch: int, micro: int, step: int, queries: list[str]) -> None:
    """Record one consumed micro-batch (no-op unless ``DIR_TRACE_BATCHES`` is set)."""
    path = os.environ.get(TRACE)
    if not path:
        return
    entry = {"pid": os.getpid(), "rank": rank, "epoch": epoch, "micro": micro, "step": step, "queries": queries}
    with open(f"{path}.rank{rank}", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def maybe_kill(rank: int, step: int) -> None:
    """SIGKILL this worker once at the configured (rank, step) (no-op unless ``DIR_FAULT_KILL``)."""
    spec = os.environ.get(KILL)
    if not spec:
        return
    want_rank, want_step = (int(x) for x in spec.split(":"))
    if (rank, step) != (want_rank, want_step):
        return
    marker = os.environ.get(MARKER)
    if not marker:
        raise RuntimeError(f"{KILL} is set without {MARKER}: the restored run would die again")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: only the first time
    except FileExistsError:
        return
    os.write(fd, f"killed rank {rank} pid {os.getpid()} after step {step}\n".encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def read_trace(path: str | Path) -> list[dict]:
    """Every traced micro-batch from all ranks' files (``PATH.rank*``), in file order per rank."""
    path = Path(path)
    entries = []
    for f in sorted(path.parent.glob(path.name + ".rank*")):
        entries.extend(json.loads(line) for line in f.read_text().splitlines() if line)
    return entries


def surviving(entries: list[dict]) -> list[dict]:
    """Drop micro-batches whose optimizer step was undone by a restore.

    Per rank, each worker process (pid) is one attempt, in file order; an attempt whose first
    traced step is s undoes the earlier attempts' entries for steps >= s (they are replayed).
    """
    keep = []
    for rank in sorted({e["rank"] for e in entries}):
        mine = [e for e in entries if e["rank"] == rank]
        first_step: dict[int, int] = {}
        for e in mine:
            first_step.setdefault(e["pid"], e["step"])
        order = list(first_step)
        for e in mine:
            later = order[order.index(e["pid"]) + 1:]
            if all(e["step"] < first_step[pid] for pid in later):
                keep.append(e)
    return keep
