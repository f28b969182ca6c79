"""Training checkpoints: one directory per checkpoint.

- ``model/``: the exported model (sentence-transformers layout, or LoRA adapter files);
- ``training_state.pt``: the data position (epoch, micro-step in epoch, optimizer step) and
  rank 0's torch RNG state, read with ``weights_only=True``; ``rng_rank<R>.pt``: every other
  rank's RNG state (dropout differs per rank, so each rank resumes its own stream);
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
    torch.save({"position": dict(position), "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path / STATE_FILE)
    return path


def load_training_state(path: Path) -> dict[str, int]:
    """Restore torch's RNG; return the data position to continue from."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    torch.set_rng_state(state["torch_rng"])
    return dict(state["position"])


def save_rank_rng(path: Path, rank: int) -> None:
    """Ranks other than 0 keep their own RNG stream in ``rng_rank<R>.pt``."""
    if rank:
        torch.save({"torch_rng": torch.get_rng_state()}, Path(path) / f"rng_rank{rank}.pt")


def load_rank_rng(path: Path, rank: int) -> None:
    """Restore this rank's RNG (after :func:`load_training_state` restored rank 0's)."""
    own = Path(path) / f"rng_rank{rank}.pt"
    if rank and own.is_file():
        torch.set_rng_state(torch.load(own, map_location="cpu", weights_only=True)["torch_rng"])
