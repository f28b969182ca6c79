"""Where a job's relative output paths go, and what code it runs (for ``ray job submit``).

A submitted job runs with its working directory set to Ray's temporary copy of ``--working-dir``
(``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), which Ray deletes when
the package is evicted. Relative *output* paths (``output_dir``, ``--out``, ``--index``) therefore
resolve under ``$IR_OUTPUT_ROOT`` when it is set (``cluster/runtime_env.yaml`` sets it); inputs such
as ``--config jobs/configs/x.yaml`` still resolve against the uploaded code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OUTPUT_ROOT_ENV = "IR_OUTPUT_ROOT"


def output_path(path: str) -> str:
    """``path`` unchanged if absolute, a URI or empty; else joined to ``$IR_OUTPUT_ROOT`` when set."""
    root = os.environ.get(OUTPUT_ROOT_ENV, "")
    if not path or not root or "://" in path or Path(path).is_absolute():
        return path
    return str(Path(root).expanduser() / path)


def announce(job: str) -> None:
    """Print which ``distributed_ir`` copy runs and where outputs go (first line of a job's log)."""
    import distributed_ir

    code = Path(distributed_ir.__file__).resolve().parent
    root = os.environ.get(OUTPUT_ROOT_ENV) or f"{Path.cwd()} (set {OUTPUT_ROOT_ENV} to change)"
    print(f"[{job}] distributed_ir code: {code}; relative outputs under: {root}", file=sys.stderr, flush=True)
