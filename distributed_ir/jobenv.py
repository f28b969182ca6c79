"""Where a job's relative output paths go, and what code it runs (for ``ray job submit``).

A submitted job runs with its working directory set to Ray's temporary copy of ``--working-dir``
(``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), which Ray deletes when
the package is evicted. Relative *output* paths (``output_dir``, ``--out``, ``--index``) therefore
resolve under ``$IR_OUTPUT_ROOT`` when it is set (``cluster/runtime_env.yaml`` sets it); inputs such
as ``--config jobs/configs/x.yaml`` still resolve against the uploaded code.  Without it, a relative
output path inside such a copy is refused with what to set: it would vanish with the copy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OUTPUT_ROOT_ENV = "IR_OUTPUT_ROOT"


def in_ray_working_dir_copy(cwd: Path | None = None) -> bool:
    """True inside Ray's temporary copy of a job's ``--working-dir`` (deleted when evicted)."""
    parts = (cwd or Path.cwd()).parts
    return "runtime_resources" in parts and "working_dir_files" in parts


def output_path(path: str) -> str:
    """``path`` unchanged if absolute, a URI or empty; else joined to ``$IR_OUTPUT_ROOT`` when set.

    Unset inside Ray's temporary working-dir copy (a ``ray job submit`` without
    ``--runtime-env cluster/runtime_env.yaml``): refused, since the outputs would vanish."""
    root = os.environ.get(OUTPUT_ROOT_ENV, "")
    if not path or "://" in path or Path(path).is_absolute():
        return path
    if not root:
        if in_ray_working_dir_copy():
            from distributed_ir.config_loader import ConfigError

            raise ConfigError(
                f"relative output path {path!r}: this job runs in Ray's temporary copy of --working-dir "
                f"({Path.cwd()}), which Ray deletes, so the outputs would vanish. Set {OUTPUT_ROOT_ENV} to a "
                "folder every node shares (e.g. `ray job submit --runtime-env cluster/runtime_env.yaml`, or "
                f"--runtime-env-json '{{\"env_vars\": {{\"{OUTPUT_ROOT_ENV}\": \"/mnt/shared/outputs\"}}}}'), "
                "or give an absolute path or an s3:// / gs:// URI")
        return path
    return str(Path(root).expanduser() / path)


def announce(job: str) -> None:
    """Print which ``distributed_ir`` copy runs and where outputs go (first line of a job's log)."""
    import distributed_ir

    code = Path(distributed_ir.__file__).resolve().parent
    root = os.environ.get(OUTPUT_ROOT_ENV) or f"{Path.cwd()} (set {OUTPUT_ROOT_ENV} to change)"
    print(f"[{job}] distributed_ir code: {code}; relative outputs under: {root}", file=sys.stderr, flush=True)
