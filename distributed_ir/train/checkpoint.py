"""Training checkpoints: one directory per checkpoint.

- ``model/``: the exported model (sentence-transformers layout, or LoRA adapter files);
- ``training_state.pt``: the data position (epoch, micro-step in epoch, optimizer step, and the
  world size that wrote it: an elastic run that resumes at another size says so) and
  rank 0's RNG state, read with ``weights_only=True``; ``rng_rank<R>.pt``: every other rank's RNG
  state (dropout differs per rank, so each rank resumes its own stream).  An RNG state is the CPU
  generator (``torch_rng``) and one CUDA generator per visible device (``cuda_rng``, empty without
  CUDA): on GPU, dropout draws from the CUDA generator;
- the engine's state: ``engine_state.pt`` + ``trainable.safetensors`` (DDP) or ``deepspeed/``
  (every rank's ZeRO partition of model and optimizer);
- ``metrics.json``: the metrics at that step; ``history.json``: every logged step so far (rank 0's
  view: loss, lr, grad norm, throughput, memory) for curves and reports.

A checkpoint or exported model may live on a pyarrow filesystem URI (``s3://bucket/run?...``,
``gs://``): :func:`download` / :func:`upload` copy whole folders (each process resolves the
filesystem and its credentials from its own environment, as pyarrow does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TRAINING_STATE_FILE = "training_state.pt"


def is_uri(path: str | Path) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: a pyarrow filesystem URI rather than a local path."""
    return "://" in str(path)


def _fs_path(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def join_uri(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended to its path, keeping a query (``?endpoint_override=...``)."""
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def download(uri: str, local: Path) -> Path:
    """Copy the folder at ``uri`` into the local folder ``local`` (created)."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such folder")
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


def require_checkpoint(uri: str) -> None:
    """Fail early (on the driver) when ``uri`` holds no training checkpoint."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    if fs.get_file_info(f"{path.rstrip('/')}/{TRAINING_STATE_FILE}").type != pafs.FileType.File:
        raise FileNotFoundError(f"resume_from={uri}: not a distributed-ir training checkpoint "
                                f"(no {TRAINING_STATE_FILE})")


def write_file(uri: str, data: bytes) -> None:
    """Write ``data`` as the file at ``uri`` (an object store shows it once the upload completes)."""
    import posixpath

    fs, path = _fs_path(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def upload(local: Path, uri: str) -> str:
    """Copy the local folder ``local`` to ``uri`` (objects under that prefix are overwritten)."""
    import pyarrow.fs as pafs

    fs, path = _fs_path(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def save_training_state(path: Path, position: dict[str, int], metrics: dict[str, Any],
                        history: list[dict[str, Any]] | None = None) -> Path:
    """Write metrics, history and then the position/RNG file (a state file means a complete checkpoint)."""
    path = Path(path)
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (path / "history.json").write_text(json.dumps(history or [metrics], indent=1))
    tmp = path / (TRAINING_STATE_FILE + ".tmp")
    torch.save({"position": dict(position), **rng_state()}, tmp)
    tmp.replace(path / TRAINING_STATE_FILE)
    return path


def load_training_state(path: Path) -> dict[str, int]:
    """Restore torch's RNG; return the data position to continue from."""
    state = torch.load(Path(path) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    set_rng_state(state)
    return dict(state["position"])


def load_history(path: Path, step: int) -> list[dict[str, Any]]:
    """The logged steps up to ``step`` from a checkpoint's ``history.json`` (a resumed run keeps
    one history across restarts and resizes; each entry records its ``world_size``)."""
    f = Path(path) / "history.json"
    if not f.is_file():
        return []
    return [h for h in json.loads(f.read_text()) if h.get("step", 0) <= step]


def save_rank_rng(path: Path, rank: int) -> None:
    """Ranks other than 0 keep their own RNG stream in ``rng_rank<R>.pt``."""
    if rank:
        torch.save(rng_state(), Path(path) / f"rng_rank{rank}.pt")


def load_rank_rng(path: Path, rank: int) -> None:
    """Restore this rank's RNG (after :func:`load_training_state` restored rank 0's)."""
    own = Path(path) / f"rng_rank{rank}.pt"
    if rank and own.is_file():
        set_rng_state(torch.load(own, map_location="cpu", weights_only=True))


def rng_state() -> dict[str, Any]:
    """This process's CPU RNG state and every visible CUDA device's (an empty list without CUDA)."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved.  CUDA streams are restored for the devices both the
    checkpoint and this process have (none when either ran without CUDA: a CPU resume of a GPU
    run, or a checkpoint from before CUDA states were saved)."""
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng") or []
    if cuda and torch.cuda.is_available():
        for device, generator in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator, device)
