"""Training checkpoints: one directory per checkpoint.

- ``model/``: the exported model (sentence-transformers layout, or LoRA adapter files);
- ``training_state.pt``: the data position (epoch, micro-step in epoch, optimizer step) and
  rank 0's RNG state, read with ``weights_only=True``; ``rng_rank<R>.pt``: every other rank's RNG
  state (dropout differs per rank, so each rank resumes its own stream).  An RNG state is the CPU
  generator (``torch_rng``) and one CUDA generator per visible device (``cuda_rng``, empty without
  CUDA): on GPU, dropout draws from the CUDA generator;
- the engine's state: ``engine_state.pt`` + ``trainable.safetensors`` (DDP) or ``deepspeed/``
  (every rank's ZeRO partition of model and optimizer);
- ``metrics.json``: the metrics at that step; ``history.json``: every logged step so far (rank 0's
  view: loss, lr, grad norm, throughput, memory) for curves and reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "training_state.pt"


def save_training_state(path: Path, position: dict[str, int], metrics: dict[str, Any],
                        history: list[dict[str, Any]] | None = None) -> Path:
    """Write metrics, history and then the position/RNG file (a state file means a complete checkpoint)."""
    path = Path(path)
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (path / "history.json").write_text(json.dumps(history or [metrics], indent=1))
    tmp = path / (STATE_FILE + ".tmp")
    torch.save({"position": dict(position), **rng_state()}, tmp)
    tmp.replace(path / STATE_FILE)
    return path


def load_training_state(path: Path) -> dict[str, int]:
    """Restore torch's RNG; return the data position to continue from."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    set_rng_state(state)
    return dict(state["position"])


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
