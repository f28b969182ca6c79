"""Training checkpoints: ``model/`` (sentence-transformers layout) + ``training_state.pt``.

The state file holds optimizer and scheduler state, the data position (epoch, micro-step in
epoch, optimizer step) and torch's RNG state.  It is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "training_state.pt"


def save_training_state(path: Path, embedder: Any, optimizer: Any, scheduler: Any, position: dict[str, int],
                        metrics: dict[str, Any]) -> Path:
    """Write a checkpoint directory atomically (temp dir, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    embedder.save(tmp / "model")
    torch.save({
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "position": dict(position),
        "torch_rng": torch.get_rng_state(),
    }, tmp / STATE_FILE)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_training_state(path: Path, optimizer: Any, scheduler: Any) -> dict[str, int]:
    """Restore optimizer/scheduler/RNG in place; return the data position to continue from."""
    state = torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return dict(state["position"])
