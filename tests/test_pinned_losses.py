"""Pinned numbers on the training path (as torchtune pins its recipes' first losses): a tiny seeded
model's first losses and gradient norms, to 1e-4.  A uniform regression (a wrong temperature, a
lost mask, a changed default, a different data order) passes "loss falls" and "A == B" checks alike;
it does not pass these.  If a deliberate change moves them, re-pin and say why in the commit."""

from __future__ import annotations

import pytest

from distributed_ir.data.records import write_records
from distributed_ir.train.loop import train_loop
from tests.test_train_loop import _cfg, _triplets

PINNED = {
    # infonce at 0.05, shared-positive mask on, 1 hard negative, tiny BERT, seed 3, lr 1e-3, batch 4
    "embedder": {"loss": [1.643089, 1.557173, 1.246988], "grad_norm": [15.30347, 19.65939, 19.07006]},
    # listwise at 0.05 over the in-batch MaxSim matrix, 16-dim head
    "colbert": {"loss": [1.928229, 2.168676, 1.923731], "grad_norm": [35.26535, 44.65110, 30.36341]},
}


@pytest.mark.parametrize("task", sorted(PINNED))
def test_first_losses_and_grad_norms_are_pinned(tiny_bert, tmp_path, task):
    write_records(tmp_path / "train.jsonl", _triplets(16))
    extra = {} if task == "embedder" else {"task": task, "reranker": {"query_max_length": 16, "document_max_length": 24, "colbert_dim": 16}}
    result = train_loop(_cfg(tiny_bert, tmp_path, max_steps=3, num_negatives=1, **extra))
    got = {k: [m[k] for m in result["history"]] for k in ("loss", "grad_norm")}
    assert got["loss"] == pytest.approx(PINNED[task]["loss"], abs=1e-4)
    assert got["grad_norm"] == pytest.approx(PINNED[task]["grad_norm"], rel=1e-4)
