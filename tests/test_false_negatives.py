"""Shared positives are not negatives: embedder (InfoNCE) and ColBERT in-batch losses, end to end
from training records through the batcher and the task's train module."""

from __future__ import annotations

import pytest
import torch

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.data.records import TrainRecord
from distributed_ir.train.batching import epoch_batches
from distributed_ir.train.tasks import get_task

# "doc a" is the positive of two queries; "doc c" is query 2's hard negative and query 1's second positive
RECORDS = [TrainRecord("what about cats", ["doc a cats purr"], ["doc d rockets"]),
           TrainRecord("why do cats sleep", ["doc b cats sleep", "doc c cats nap"], ["doc e bread"]),
           TrainRecord("tell me of cats", ["doc a cats purr"], ["doc c cats nap"])]


def _task(model, task: str, mask: bool):
    cfg = {"task": task, "model": {"name_or_path": str(model), "query_max_length": 16, "document_max_length": 24},
           "loss": {"name": "infonce" if task == "embedder" else "listwise", "temperature": 0.1,
                    "mask_shared_positives": mask},
           "reranker": {"query_max_length": 16, "document_max_length": 24, "colbert_dim": 8}}
    return get_task(from_dict(TrainConfig, cfg))


def _scores(task, module, batch) -> torch.Tensor:
    """[B, N] similarity of each query to every batch document (positives, then negatives)."""
    docs = batch.positives + batch.negatives
    if task.name == "embedder":
        e = module.embedder
        return e(**e.tokenize(batch.queries, "query")) @ e(**e.tokenize(docs, "document")).T
    r = module.reranker
    return r(r.tokenize(batch.queries, "query"), r.tokenize(docs, "document"), all_pairs=True)


@pytest.mark.parametrize("kind", ["embedder", "colbert"])
def test_loss_equals_the_batch_with_each_document_once_and_no_positive_as_negative(tiny_bert, kind):
    torch.manual_seed(0)
    task = _task(tiny_bert, kind, mask=True)
    module = task.build().eval()
    batch = next(epoch_batches(RECORDS, 0, 0, 1, 3, 1, seed=0))
    with torch.no_grad():
        loss = float(module(**task.inputs(module, batch)))
        scores = _scores(task, module, batch)
    # by hand: each distinct document once; a query's other positives are not its negatives
    docs = batch.positives + batch.negatives
    distinct = list(dict.fromkeys(docs))
    by_query = {r.query: r for r in RECORDS}
    expected = 0.0
    for i, query in enumerate(batch.queries):
        label = batch.positives[i]
        cols = [d for d in distinct if d == label or d not in by_query[query].positive]
        row = torch.stack([scores[i, docs.index(d)] for d in cols]) / 0.1
        expected += float(-torch.log_softmax(row, 0)[cols.index(label)])
    assert abs(loss - expected / 3) < 1e-5
    # the batch really has false negatives: without the mask the loss differs
    plain = _task(tiny_bert, kind, mask=False)
    with torch.no_grad():
        assert abs(float(module(**plain.inputs(module, batch))) - loss) > 1e-4
