"""Reranker-to-embedder distillation: records with teacher scores, the KL term in training (alone or
beside InfoNCE), on DDP and DeepSpeed; a tiny model learns the teacher's order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distributed_ir.data.errors import DataError
from distributed_ir.data.records import TrainRecord, read_records, write_records
from distributed_ir.models.embedder import Embedder
from distributed_ir.train.loop import train_loop
from tests.conftest import TRAIN_TOPICS, loop_config


def _records(n=16):
    """Query i, its on-topic positive and two negatives; the teacher prefers negative "b" over "a"
    (the opposite of word overlap for half of them), so its order is not the lexical one."""
    out = []
    for i in range(n):
        topic = TRAIN_TOPICS[i % 8]
        out.append(TrainRecord(query=f"what about {topic.split()[0]} {i}", positive=[f"{topic} fact {i}"],
                               negative=[f"{topic.split()[0]} unrelated {TRAIN_TOPICS[(i + 3) % 8]} {i}",
                                         f"{TRAIN_TOPICS[(i + 5) % 8]} more {i}"],
                               scores=[5.0, 0.0, 2.5]))
    return out


def _teacher_order_agreement(model_dir, records) -> float:
    """Fraction of queries whose negatives the student orders as the teacher does (b above a):
    the part of the teacher's order that contrastive training on the positive does not teach."""
    emb = Embedder.load(model_dir)
    agree = 0
    for r in records:
        s = (emb.encode([r.query], "query") @ emb.encode(r.negative, "document").T)[0]
        agree += int((s[1] > s[0]) == (r.scores[2] > r.scores[1]))
    return agree / len(records)


def test_scores_are_read_checked_and_written(tmp_path):
    write_records(tmp_path / "r.jsonl", _records(2))
    fmt, recs = read_records(tmp_path / "r.jsonl")
    assert fmt == "triplet" and recs[1].scores == [5.0, 0.0, 2.5]
    row = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    row["scores"] = [1.0, 2.0]
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'scores': 2 scores for 3 documents"):
        read_records(tmp_path / "bad.jsonl")
    row["scores"] = [1.0, "x", 2.0]
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'scores': item 1"):
        read_records(tmp_path / "bad.jsonl")


def test_records_without_scores_are_refused_for_distillation(tiny_bert, tmp_path):
    recs = _records(8)
    recs[5].scores = None
    write_records(tmp_path / "train.jsonl", recs)
    with pytest.raises(ValueError, match="record 6 has no scores"):
        train_loop(loop_config(tiny_bert, tmp_path, num_negatives=2, loss={"name": "distill"}))


@pytest.mark.parametrize("loss", [{"name": "distill", "temperature": 0.1}, {"name": "infonce", "distill_weight": 1.0},
                                  {"name": "infonce"}])  # the control: contrastive alone does not learn it
def test_distillation_trains_a_tiny_model_toward_the_teachers_order(tiny_bert, tmp_path, loss):
    records = _records(16)
    write_records(tmp_path / "train.jsonl", records)
    train_loop(loop_config(tiny_bert, tmp_path, epochs=10, num_negatives=2, loss=loss,
                           optim={"lr": 3e-3, "warmup_ratio": 0.0}))
    before = _teacher_order_agreement(tiny_bert, records)
    after = _teacher_order_agreement(tmp_path / "out" / "checkpoints" / "final" / "model", records)
    if loss == {"name": "infonce"}:
        assert after < 0.6, (before, after)
    else:
        assert after >= 0.9 and after > before + 0.5, (before, after)


@pytest.mark.slow
def test_distillation_on_deepspeed_follows_ddp(tiny_bert, tmp_path):
    write_records(tmp_path / "train.jsonl", _records(16))
    losses = {}
    for name, engine in (("ddp", {"name": "ddp"}), ("zero2", {"name": "deepspeed", "zero_stage": 2})):
        result = train_loop(loop_config(tiny_bert, tmp_path, max_steps=3, num_negatives=2, engine=engine,
                                        output_dir=str(tmp_path / name),
                                        loss={"name": "infonce", "distill_weight": 0.5}))
        losses[name] = [m["loss"] for m in result["history"]]
    np.testing.assert_allclose(losses["zero2"], losses["ddp"], atol=1e-4)
    # and the KL term is really in it: a run without it differs
    plain = train_loop(loop_config(tiny_bert, tmp_path, max_steps=3, num_negatives=2,
                                   output_dir=str(tmp_path / "plain")))
    assert abs(plain["history"][0]["loss"] - losses["ddp"][0]) > 1e-3
