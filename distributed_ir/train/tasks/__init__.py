"""Training tasks, one per file, by ``TrainConfig.task``: ``embedder``, ``cross_encoder``, ``colbert``,
``llm_reranker`` (see :mod:`~distributed_ir.train.tasks.base` for what a task is)."""

from __future__ import annotations

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import ConfigError
from distributed_ir.train.tasks.base import TrainTask
from distributed_ir.train.tasks.colbert import ColBERTTask
from distributed_ir.train.tasks.cross_encoder import CrossEncoderTask
from distributed_ir.train.tasks.embedder import EmbedderTask
from distributed_ir.train.tasks.llm_reranker import LLMRerankerTask

TASKS: dict[str, type[TrainTask]] = {
    task.name: task for task in (EmbedderTask, CrossEncoderTask, ColBERTTask, LLMRerankerTask)}


def get_task(cfg: TrainConfig) -> TrainTask:
    """The task ``cfg.task`` names, built for ``cfg``."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r}: expected one of {', '.join(TASKS)}", key="task")
    return TASKS[cfg.task](cfg)


__all__ = ["TASKS", "TrainTask", "get_task"]
