"""Per-part searcher actors: an index whose parts no single process should hold, searched as one.

Each actor is a :class:`~distributed_ir.index.parts.PartSearcher` holding one group of the index's
parts (one part by default), placed by the actor plan: it asks for a fraction of a CPU, the memory
its parts take (so no node is handed more parts than it can hold), and a GPU share when asked (GPU
FAISS when FAISS inside the actor sees the device). The query actors encode a batch, hand the
vectors to every searcher at once (:class:`RemoteParts`) and merge the per-group top-k lists with
the ranking rule (:func:`~distributed_ir.index.parts.merge_hits`): exactly the hits of one process
holding every part. The driver only starts and stops the searchers; vectors and hits move between
the query actors and the searchers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from distributed_ir.index.actors import actor_plan, wait_started
from distributed_ir.index.parts import Hits, PartSearcher, merge_hits, part_groups, part_sizes
from distributed_ir.index.storage import Location

# A searcher's FAISS calls are short bursts between query batches; what it holds is memory (asked
# for separately). A quarter CPU each leaves room for the query actors and Ray Data's tasks on a
# small node (DESIGN.md pitfalls: a pool holding every CPU hangs silently).
SEARCHER_CPUS = 0.25
SEARCHER_RESTARTS = 3  # a searcher lost with its node is rebuilt (it reloads its parts) and the call retried


class RemoteParts:
    """The parts held by searcher actors, searched as one (:meth:`PartSearcher.search`'s interface)."""

    def __init__(self, handles: list):
        self.handles = list(handles)

    def search(self, queries: np.ndarray, k: int) -> Hits:
        """Every searcher's top ``k`` for ``queries``, merged by the ranking rule."""
        import ray

        ref = ray.put(np.ascontiguousarray(queries, dtype=np.float32))  # one copy for every searcher
        return merge_hits(ray.get([h.search.remote(ref, k) for h in self.handles]), k)


def searcher_groups(index_dir: str, searchers: int = 0) -> list[list[int]]:
    """The part groups of ``index_dir``'s index, one per searcher (0: one part per searcher)."""
    return part_groups(len(part_sizes(Location(index_dir).child("index"))), searchers)


@contextmanager
def part_searchers(index_dir: str, groups: list[list[int]], gpus: float = 0.0, timeout_s: float = 600,
                   stats: list[dict[str, Any]] | None = None) -> Iterator[list | None]:
    """Start one searcher actor per group of parts, wait (at most ``timeout_s``, an autoscaler may
    be adding nodes) until each holds its parts, yield their handles, and stop them on exit.

    One group: yields None and starts nothing (the query actors hold the parts themselves).
    ``gpus``: GPUs each searcher asks for (0: CPU FAISS; a fraction lets searchers share one).
    ``stats``: filled on a clean exit with each searcher's :meth:`PartSearcher.held`.
    """
    if len(groups) <= 1:
        yield None
        return
    import ray

    folder = Location(index_dir).child("index")
    sizes = part_sizes(folder)
    plan = replace(actor_plan(use_gpu=gpus > 0, actors=len(groups), cluster_cpus=1),
                   num_cpus=SEARCHER_CPUS, num_gpus=gpus)
    memory = [max(1, sum(sizes[j] for j in group)) for group in groups]
    actor = ray.remote(PartSearcher)
    handles = [actor.options(**plan.actor_options(), memory=m, max_restarts=SEARCHER_RESTARTS,
                             max_task_retries=SEARCHER_RESTARTS).remote(folder, group, gpus > 0)
               for group, m in zip(groups, memory)]
    try:
        wait_started([h.held.remote() for h in handles], {**plan.request(), "memory": max(memory)}, timeout_s,
                     "part searchers")
        yield handles
        if stats is not None:
            stats += ray.get([h.held.remote() for h in handles])
    finally:
        for h in handles:
            ray.kill(h)
