"""Pinned numbers on the training path (as torchtune pins its recipes' first losses): a tiny seeded
model's first losses and gradient norms, to 1e-4.  A uniform regression (a wrong temperature, a
lost mask, a changed default, a different data order) passes "loss falls" and "A == B" checks alike;
it does not pass these.  If a deliberate change moves them, re-pin (``PINNED`` in conftest.py) and say
why in the commit."""

from __future__ import annotations

import pytest

from distributed_ir.data.records import write_records
from distributed_ir.train.loop import train_loop
from tests.conftest import PINNED, loop_config, triplets


@pytest.mark.parametrize("task", sorted(PINNED))
def test_first_losses_and_grad_norms_are_pinned(tiny_bert, tmp_path, task):
    write_records(tmp_path / "train.jsonl", triplets(16))
    extra = {} if task == "embedder" else {"task": task, "reranker": {"query_max_length": 16, "document_max_length": 24, "colbert_dim": 16}}
    result = train_loop(loop_config(tiny_bert, tmp_path, max_steps=3, num_negatives=1, **extra))
    got = {k: [m[k] for m in result["history"]] for k in ("loss", "grad_norm")}
    assert got["loss"] == pytest.approx(PINNED[task]["loss"], abs=1e-4)
    assert got["grad_norm"] == pytest.approx(PINNED[task]["grad_norm"], rel=1e-4)
