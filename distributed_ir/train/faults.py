"""Opt-in fault injection and batch tracing for the training loop (tests and drills only).

Both are off unless their environment variable is set; the loop calls two hooks that return at
once otherwise.  :func:`forwarded_env` hands these variables to Ray Train workers (whose
processes do not inherit the driver's environment).

- ``DIR_FAULT_KILL=RANK:STEP`` with ``DIR_FAULT_MARKER=PATH``: worker ``RANK`` sends itself
  SIGKILL right after optimizer step ``STEP`` (before that step's checkpoint), like a node
  dying.  The marker file is created first, so the restored run does not die again.
- ``DIR_TRACE_BATCHES=PATH``: each rank appends one JSON line per consumed micro-batch to
  ``PATH.rank<R>``: ``{"pid", "attempt", "world_size", "rank", "epoch", "micro", "step", "t",
  "queries"}`` where ``step`` is the optimizer step the micro-batch feeds and ``attempt`` names
  one start of the worker group (rank 0 draws it, every rank shares it; attempts sort by start
  time).  A test can then check that, counting only steps that survived a restore or resize, no
  record is skipped or seen twice within an epoch.
- ``DIR_FAULT_HOLD=STEP[,STEP...]`` with ``DIR_FAULT_HOLD_DIR=DIR``: after optimizer step STEP
  (and its checkpoint or report) each rank writes ``DIR/held-STEP-rank<R>`` and waits until
  ``DIR/release-STEP`` exists.  A drill parks the run there to remove or add a node at a known
  point (Ray Train's resize then ends the waiting workers).
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


def forwarded_env() -> dict[str, str]:
    """The fault/trace variables set in this (driver) process, for ``worker_runtime_env``."""
    return {k: os.environ[k] for k in (KILL, MARKER, TRACE, HOLD, HOLD_DIR) if os.environ.get(k)}


def attempt_id(rank: int, world_size: int) -> str | None:
    """One id per start of the worker group, shared by its ranks (None unless tracing).

    ``<start time>-<random>``: sorting ids sorts attempts by start.  Rank 0 draws it and
    broadcasts it (a collective: every rank calls this at the same point of setup)."""
    if not os.environ.get(TRACE):
        return None
    ident = [f"{time.time():.6f}-{uuid.uuid4().hex[:8]}" if rank == 0 else None]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(ident, src=0)
    return ident[0]


def trace_batch(rank: int, epoch: int, micro: int, step: int, queries: list[str], attempt: str | None = None,
                world_size: int = 1) -> None:
    """Record one consumed micro-batch (no-op unless ``DIR_TRACE_BATCHES`` is set)."""
    path = os.environ.get(TRACE)
    if not path:
        return
    entry = {"pid": os.getpid(), "attempt": attempt or str(os.getpid()), "world_size": world_size, "rank": rank,
             "epoch": epoch, "micro": micro, "step": step, "t": time.time(), "queries": queries}
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


def maybe_hold(rank: int, step: int) -> None:
    """Park this worker after ``step`` until the drill releases it (no-op unless ``DIR_FAULT_HOLD``)."""
    spec = os.environ.get(HOLD)
    if not spec or step not in {int(x) for x in spec.split(",") if x}:
        return
    folder = Path(os.environ[HOLD_DIR])
    (folder / f"held-{step}-rank{rank}").write_text(str(os.getpid()))
    while not (folder / f"release-{step}").exists():
        time.sleep(0.2)


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
