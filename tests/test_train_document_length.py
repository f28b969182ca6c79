"""``train_document_max_length``: documents are cut shorter while training only; the saved model
keeps its own document length for encoding and scoring."""

from __future__ import annotations

import json

import pytest

from distributed_ir.config import ConfigError, TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.data.records import TrainRecord
from distributed_ir.train.batching import epoch_batches
from distributed_ir.train.tasks import get_task

LONG = " ".join(f"word{i}" for i in range(60))  # far past both lengths below
RECORDS = [TrainRecord("short query one", [LONG + " cats"], [LONG + " rockets"]),
           TrainRecord("short query two", [LONG + " bread"], [LONG + " rivers"])]


def _task(model, kind: str, train_len: int):
    cfg = {"task": kind, "train_document_max_length": train_len,
           "model": {"name_or_path": str(model), "query_max_length": 16, "document_max_length": 24},
           "loss": {"name": "infonce" if kind == "embedder" else "listwise"},
           "reranker": {"query_max_length": 16, "document_max_length": 24, "colbert_dim": 8}}
    return get_task(from_dict(TrainConfig, cfg))


def _documents(inputs: dict):
    return inputs["document"]["input_ids"], inputs["query"]["input_ids"]


@pytest.mark.parametrize("kind", ["embedder", "colbert"])
def test_training_cuts_documents_and_the_saved_model_keeps_its_length(tiny_bert, tmp_path, kind):
    batch = next(epoch_batches(RECORDS, 0, 0, 1, 2, 1, seed=0))
    full, short = _task(tiny_bert, kind, 0), _task(tiny_bert, kind, 10)
    module = short.build()
    docs_full, queries_full = _documents(full.inputs(module, batch))
    docs_short, queries_short = _documents(short.inputs(module, batch))
    assert docs_full.shape[1] == 24 and docs_short.shape[1] == 10  # long documents: cut at each length
    assert queries_short.tolist() == queries_full.tolist()  # queries keep theirs
    assert docs_short[:, :9].tolist() == docs_full[:, :9].tolist()  # the same tokens, cut sooner
    short.export(module, tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "distributed_ir.json").read_text())
    section = saved["settings"] if kind == "embedder" else saved["reranker"]
    assert section["document_max_length"] == 24


def test_rejected_where_documents_are_not_encoded_alone(tiny_bert):
    with pytest.raises(ConfigError, match="train_document_max_length"):
        _task(tiny_bert, "cross_encoder", 10)
    with pytest.raises(ConfigError, match=">= 0"):
        _task(tiny_bert, "embedder", -1)
