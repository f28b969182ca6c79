"""A Ray Train controller callback that says when and why the worker group's size changed.

Lives in its own module because it subclasses Ray Train V2's ``UserCallback`` (importing
``ray.train`` at module level); :func:`distributed_ir.train.launch.run_training` imports it lazily.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback


class WorldSizeLog(UserCallback):
    """Runs on the controller.  Worker failures are remembered (``after_exception``); the first
    report from a group of another size prints the change, the step it reported and why: a shrink
    follows a lost worker or node, a grow follows room for more workers (elastic).  Each worker
    also prints the change on resume, and every history entry records its ``world_size``."""

    def __init__(self) -> None:
        self.size: int | None = None
        self.failure = ""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
        first = next(iter(worker_exceptions.values()), None)
        detail = (str(first).strip().splitlines() or [""])[0][:200] if first is not None else ""
        self.failure = f"rank(s) {ranks} failed: {type(first).__name__}: {detail}"
        print(f"[train] {self.failure}; Ray Train restarts from the latest checkpoint", flush=True)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        size = len(metrics)
        if self.size is not None and size != self.size:
            step = metrics[0].get("step") if metrics else None
            if size < self.size:
                why = f"a worker was lost ({self.failure or 'its node left the cluster'})"
            else:
                why = "room for more workers appeared (elastic grow)"
            print(f"[train] world size changed {self.size} -> {size} at step {step}: {why}", flush=True)
            self.failure = ""
        self.size = size
