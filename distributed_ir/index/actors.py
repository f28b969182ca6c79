"""The one actor plan for every Ray Data actor pool (encode, query search, rerank).

A pool *asks* for what it needs: ``min..max`` actors, each with its CPUs, GPUs and custom
resources. Nothing is sized from ``ray.cluster_resources()`` at start and nothing raises because
a resource is absent yet: on an autoscaling cluster that starts with no GPU (or no ``encoder``)
node, the pending actors are the demand that makes the autoscaler add nodes, and Ray Data grows
the pool up to ``max`` as they arrive. The wait for the first ``min`` actors is bounded
(:func:`starting_actors`), and a pool that cannot start says which resource it waited for.

This module is also the one place that knows Ray Data's actor-pool API (Ray 2.60:
``compute=ActorPoolStrategy(min_size=, max_size=)``).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

# CPU actors reserve half a CPU: two actors asking for 1 CPU each on a 2-CPU node hold every CPU
# and Ray Data's own tasks never run (DESIGN.md pitfalls: a silent hang).
CPU_ACTOR_CPUS = 0.5


@dataclass(frozen=True)
class ActorPlan:
    """What each actor of a pool requests and how many actors the pool may hold.

    ``threads``: torch threads per CPU actor (0 on GPU: torch's default). ``device``: ``cpu`` or
    ``cuda``, handed to the actor's constructor.
    """

    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    threads: int
    device: str
    resources: dict[str, float] = field(default_factory=dict)

    def request(self) -> dict[str, float]:
        """One actor's resource request, as Ray names the resources."""
        return {"CPU": self.num_cpus, **({"GPU": self.num_gpus} if self.num_gpus else {}), **self.resources}

    def map_kwargs(self, max_tasks_in_flight_per_actor: int | None = None) -> dict[str, Any]:
        """``compute`` and resource arguments for ``Dataset.map_batches``."""
        from ray.data import ActorPoolStrategy

        strategy = ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size,
                                     max_tasks_in_flight_per_actor=max_tasks_in_flight_per_actor)
        return {"compute": strategy, "num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                **({"resources": dict(self.resources)} if self.resources else {})}

    def actor_options(self) -> dict[str, Any]:
        """Resource arguments for ``ray.remote(cls).options(...)`` (actors outside Ray Data)."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                **({"resources": dict(self.resources)} if self.resources else {})}

    def missing(self, cluster: dict[str, float]) -> dict[str, float]:
        """The part of one actor's request that ``cluster`` (its total resources) does not have yet."""
        return absent(self.request(), cluster)


def absent(request: dict[str, float], cluster: dict[str, float]) -> dict[str, float]:
    """The part of ``request`` that ``cluster`` (its total resources) does not have yet."""
    return {k: v for k, v in request.items() if v > 0 and cluster.get(k, 0) < v}


def actor_plan(use_gpu: bool = False, actors: int = 0, min_actors: int = 0, max_actors: int = 0, units: int = 0,
               resources: dict[str, float] | None = None, cluster_cpus: float | None = None) -> ActorPlan:
    """The pool for ``units`` units of work (0 = unknown).

    ``actors`` > 0: a fixed pool of that many. Otherwise ``min_actors..max_actors`` (defaults 1 and
    ``units``): the pool starts at the minimum and grows while there is queued work and the cluster
    (which may be growing) has room. Never more actors than units of work. GPU actors take one GPU
    each; CPU actors take :data:`CPU_ACTOR_CPUS` and run ``cluster CPUs now // max`` torch threads
    (at least 1): a thread hint from the cluster as it is, never a limit on the pool.
    """
    if min(actors, min_actors, max_actors, units) < 0:
        raise ValueError(f"actor counts must be >= 0 (actors={actors}, min={min_actors}, max={max_actors})")
    if min_actors and max_actors and min_actors > max_actors:
        raise ValueError(f"min actors {min_actors} > max actors {max_actors}")
    if actors:
        low = high = actors
    else:
        high = max_actors or units or max(1, min_actors)
        low = min(min_actors or 1, high)
    if units:
        low, high = min(low, units), min(high, units)
    extra = {k: float(v) for k, v in (resources or {}).items() if v > 0}
    if use_gpu:
        return ActorPlan(low, high, num_cpus=1, num_gpus=1, threads=0, device="cuda", resources=extra)
    if cluster_cpus is None:
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 1)
    threads = max(1, int(cluster_cpus // high))
    return ActorPlan(low, high, num_cpus=CPU_ACTOR_CPUS, num_gpus=0, threads=threads, device="cpu", resources=extra)


class ActorStartTimeout(RuntimeError):
    """The pool's first actors did not start in time (no node has, or got, what they ask for)."""


@contextmanager
def starting_actors(plan: ActorPlan, timeout_s: float, what: str = "actors") -> Iterator[None]:
    """Build *and* run a Ray Data pipeline inside this block (a Dataset copies the DataContext when
    it is created): its pool waits at most ``timeout_s`` for its first ``min`` actors, and grows
    toward ``max`` as soon as every actor is busy while work is queued.

    While a requested resource is absent from the cluster, say that we wait for the autoscaler.
    Ray Data's ``GetTimeoutError`` becomes :class:`ActorStartTimeout` naming the request.
    """
    import ray
    from ray.data import DataContext

    announce_wait(plan.request(), plan.min_size, timeout_s, what)
    ctx = DataContext.get_current()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, max(1, int(timeout_s))
    # Ray Data grows a pool only above 175% utilisation (tasks in flight / actor slots); with one
    # task in flight per actor (encode: a shard is a big unit) that is never reached and the pool
    # would stay at its minimum. 100%: every actor busy -> add one (queued work only: once the
    # input is all handed out Ray Data shrinks the pool).
    saved_scaling = ctx.autoscaling_config
    ctx.autoscaling_config = replace(saved_scaling, actor_pool_util_upscaling_threshold=1.0)
    timed_out = False
    try:
        yield
    except ray.exceptions.GetTimeoutError as e:
        if "starting actors" not in str(e):
            raise
        timed_out = True
    finally:
        ctx.wait_for_min_actors_s, ctx.autoscaling_config = saved, saved_scaling
    if timed_out:  # raised outside the except: the new error holds no traceback of the failed pool
        release_failed_pool()
        raise start_timeout(plan.request(), plan.min_size, timeout_s, what)


def announce_wait(request: dict[str, float], count: int, timeout_s: float, what: str, kind: str = "actor(s)") -> bool:
    """Say on stderr that ``count`` actors (or tasks) wait for a resource the cluster does not have
    yet; whether it lacks one."""
    import ray

    missing = absent(request, ray.cluster_resources())
    if missing:
        print(f"[{what}] the Ray cluster does not have {missing} yet: waiting up to {timeout_s:g} s for "
              f"{count} {kind} asking for {request} (an autoscaler adds such nodes)", file=sys.stderr, flush=True)
    return bool(missing)


def start_timeout(request: dict[str, float], count: int, timeout_s: float, what: str,
                  kind: str = "actor(s)") -> ActorStartTimeout:
    """The error for ``count`` actors (or tasks) asking for ``request`` that did not start in time."""
    import ray

    now = absent(request, ray.cluster_resources())
    return ActorStartTimeout(
        f"{what}: {count} {kind} asking for {request} each did not start within {timeout_s:g} s"
        + (f"; the cluster still does not have {now}" if now else "; the cluster lacks free room for them")
        + ". Add nodes with these resources (or an autoscaler node type that has them), lower the request, "
          "or raise the start timeout")


def wait_started(ready: list, request: dict[str, float], timeout_s: float, what: str) -> list:
    """``ray.get(ready)`` for calls on actors just created with ``request`` each (their first call
    runs once the actor is placed and constructed), waiting at most ``timeout_s``; on timeout
    :class:`ActorStartTimeout` names the request and what the cluster still lacks."""
    import ray

    announce_wait(request, len(ready), timeout_s, what)
    try:
        return ray.get(ready, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        pass
    raise start_timeout(request, len(ready), timeout_s, what)


def wait_for_resources(request: dict[str, float], pending: list, timeout_s: float, what: str,
                       poll_s: float = 1.0) -> None:
    """Tasks ``pending`` ask for ``request`` each: while the cluster lacks part of it (an autoscaler
    adds nodes for pending demand), wait up to ``timeout_s`` for it to appear; then cancel them and
    raise :class:`ActorStartTimeout`. Returns at once when the cluster has every resource (busy
    resources are not waited for here: the tasks queue for them)."""
    import time

    import ray

    if not announce_wait(request, len(pending), timeout_s, what, "task(s)"):
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if not absent(request, ray.cluster_resources()):
            return
    for ref in pending:
        ray.cancel(ref, force=True)
    raise start_timeout(request, len(pending), timeout_s, what, "task(s)")


def release_failed_pool() -> None:
    """Let the actors of a Ray Data pipeline that just failed go.

    On failure Ray Data drops its actor handles instead of killing the actors, and the handles
    still sit in reference cycles through the exception's traceback frames: until a garbage
    collection the actors stay alive (holding their GPU or custom resource) and pending ones keep
    asking the autoscaler for nodes. Seen: a retry's fresh pool waiting forever for an
    ``encoder`` slot the failed pool's actors still held.
    """
    gc.collect()
