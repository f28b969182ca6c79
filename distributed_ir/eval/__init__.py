"""Evaluation: trec_eval-equal metrics and retrieval evaluation."""

from distributed_ir.eval.metrics import evaluate, evaluate_per_query, read_run, write_run

__all__ = ["evaluate", "evaluate_per_query", "read_run", "write_run"]
