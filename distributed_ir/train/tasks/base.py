"""What a training task is: what is trained, independent of how (the engine) and where (Ray Train).

A task builds the *train module* — an ``nn.Module`` whose ``forward(**inputs)`` returns the scalar
loss, so DDP and DeepSpeed see exactly one forward per backward — turns a
:class:`~distributed_ir.train.batching.TextBatch` into that forward's inputs, and exports the
user-facing model from the train module's full state dict (gathered on rank 0 under ZeRO-3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from distributed_ir.config import TrainConfig
from distributed_ir.train.batching import TextBatch


class TrainTask:
    """Base class: subclasses set ``name`` and ``formats`` and implement ``build``, ``inputs`` and ``export``."""

    name: ClassVar[str] = ""
    formats: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def check_format(self, fmt: str, path: str) -> None:
        if fmt not in self.formats:
            raise ValueError(f"{path}: task {self.name!r} with loss {self.cfg.loss.name!r} needs "
                             f"{' or '.join(self.formats)} records, the file holds {fmt} records")

    def build(self, weights_from: str | None = None) -> nn.Module:
        """The train module; ``weights_from`` = a previously exported model to start from."""
        raise NotImplementedError

    def inputs(self, module: nn.Module, batch: TextBatch) -> dict[str, Any]:
        """Tokenised CPU tensors (and plain values) for ``train_module(**inputs)``; ``module`` unwrapped."""
        raise NotImplementedError

    def export(self, module: nn.Module, path: Path) -> Path:
        """Write the user-facing model from a CPU train module holding the trained weights."""
        raise NotImplementedError

    def check_records(self, records: list, path: str) -> None:
        """Refuse records this task's loss cannot train on (beyond their format)."""

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups (a task may give a head its own learning rate)."""
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute the activations of a Hugging Face model's layers in backward (``gradient_checkpointing``)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
