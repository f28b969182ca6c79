"""The pipeline's distillation stage on a real local Ray cluster: mine with a tiny BERT -> a tiny
cross-encoder teacher scores every mined record's positives + negatives on Ray Data actors ->
records with ``scores`` (OUT/distill_records.jsonl) -> training on InfoNCE + KL; and the config
errors that keep a distillation run from training without the scores."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from distributed_ir.config import DistillConfig, PipelineConfig
from distributed_ir.config_loader import ConfigError, load_config, to_dict
from distributed_ir.data.records import TrainRecord, read_records
from distributed_ir.eval.rerank import RerankStage
from distributed_ir.pipeline_distill import DISTILL_RECORDS, distill_stage, teacher_pairs
from tests.conftest import build_tiny_model, write_tiny_beir


def _overrides(tmp_path, tiny_bert, teacher, *extra: str) -> list[str]:
    return [f"data_dir={tmp_path / 'data'}", "dataset=tiny", "train_split=train", "eval_split=test",
            f"output_dir={tmp_path / 'out'}", "skip_base_eval=true", f"train.model.name_or_path={tiny_bert}",
            "train.model.query_max_length=16", "train.model.document_max_length=32", "train.scaling.num_workers=1",
            "train.scaling.torch_threads=1", "train.batch_size=4", "train.max_steps=1", "train.log_every=1",
            "train.num_negatives=2", "train.seed=5", "train.loss.distill_weight=1.0",
            "train.loss.teacher_temperature=0.1", "eval.batch_size=16", "eval.top_k=10", "eval.num_shards=2",
            "mining.enabled=true", "mining.rank_start=1", "mining.rank_end=12", "mining.per_query=2",
            "distill.enabled=true", f"distill.teacher={teacher}", "distill.batch_size=4", "distill.precision=fp32",
            "distill.actors=2", *extra]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny cross-encoder whose random scores depend on the text (a wider init than tiny_bert's)."""
    from distributed_ir.models.cross_encoder import CrossEncoderReranker

    root = tmp_path_factory.mktemp("teacher")
    backbone = build_tiny_model(root / "bert", initializer_range=0.2)
    return CrossEncoderReranker.from_pretrained(str(backbone), max_length=48).save(root / "ce")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_bert, teacher, ray_cluster):
    """One pipeline run with distillation; the driver may build neither an embedder nor a reranker."""
    from distributed_ir.models import rerankers
    from distributed_ir.models.embedder import Embedder
    from distributed_ir.pipeline import run_pipeline

    tmp_path = tmp_path_factory.mktemp("distill")
    write_tiny_beir(tmp_path / "data" / "tiny")
    cfg = load_config(PipelineConfig, None, _overrides(tmp_path, tiny_bert, teacher))

    def refuse(*a, **k):
        raise AssertionError("the driver must not build a model")

    with pytest.MonkeyPatch.context() as mp:  # this process only: Ray actors import the real ones
        mp.setattr(Embedder, "__init__", refuse)
        mp.setattr(RerankStage, "__init__", refuse)
        mp.setattr(rerankers, "load_reranker", refuse)
        report = run_pipeline(cfg)
    return cfg, tmp_path / "out", report


@pytest.mark.slow
@pytest.mark.ray
def test_teacher_scores_are_the_rerankers_and_align_with_positive_and_negative(distilled, teacher):
    cfg, out, report = distilled
    _, mined = read_records(out / "train_records.jsonl")
    fmt, scored = read_records(out / DISTILL_RECORDS)
    # the mined records, each with the teacher's score of every positive then every negative
    assert fmt == "triplet" and len(scored) == len(mined) == 8
    assert [replace(r, scores=None) for r in scored] == mined
    texts = [(r.query, t) for r in scored for t in r.positive + r.negative]
    assert all(len(r.scores) == len(r.positive) + len(r.negative) == 4 for r in scored)
    local = RerankStage(str(teacher), batch_size=3, precision="fp32", device="cpu").score(
        [q for q, _ in texts], [t for _, t in texts])
    np.testing.assert_allclose([s for r in scored for s in r.scores], local, atol=1e-4)
    # scores that differ within each record: a misaligned list would not match
    assert all(max(r.scores) - min(r.scores) > 1e-3 for r in scored)

    saved = json.loads((out / "metrics.json").read_text())
    facts = saved["distill"]
    assert facts == report["distill"] and facts["teacher"] == str(teacher)
    assert (facts["records"], facts["scored_records"], facts["kept_scores"], facts["dropped_without_negatives"]) \
        == (8, 8, 0, 0)
    assert facts["pairs"] == len(set(texts)) and facts["pairs_per_s"] > 0 and 1 <= facts["actors"] <= 2
    assert saved["train"]["records"] == 8


@pytest.mark.slow
@pytest.mark.ray
def test_training_takes_the_teachers_scores(distilled, tmp_path):
    """The pipeline's first training loss is InfoNCE + KL on distill_records.jsonl (the same step in
    this process gives it), not InfoNCE alone."""
    from distributed_ir.train.loop import train_loop

    cfg, out, report = distilled
    first = report["train"]["loss"]

    def one_step(loss):
        train = replace(cfg.train, train_path=str(out / DISTILL_RECORDS), output_dir=str(tmp_path / str(loss)),
                        loss=loss)
        return train_loop(to_dict(train))["history"][0]["loss"]

    assert one_step(cfg.train.loss) == pytest.approx(first, abs=1e-4)
    contrastive = one_step(replace(cfg.train.loss, distill_weight=0.0))
    assert abs(contrastive - first) > 1e-2, (contrastive, first)


@pytest.mark.ray
def test_given_scores_are_kept_unless_rescore(tmp_path, teacher, ray_cluster):
    records = [TrainRecord("cats purr?", ["cats purr fact 0"], ["rockets fly", "bread rises"], scores=[9.0, 8.0, 7.0]),
               TrainRecord("what about bees", ["bees buzz fact 5"], ["chess games 3", "rockets fly"]),
               TrainRecord("what about bees", ["bees buzz fact 11"], ["rockets fly"]),  # a pair shared with the above
               TrainRecord("rivers?", ["rivers flow fact 3"])]  # no negatives: nothing to distill
    pairs, slots = teacher_pairs(records[:3], rescore=False)
    assert slots[0] is None and len(pairs["query"]) == 3 + 1  # ("what about bees", "rockets fly") once
    assert [pairs["document"][i] for i in slots[2]] == ["bees buzz fact 11", "rockets fly"] == records[2].positive \
        + records[2].negative
    assert [len(d) for d in pairs["document"]] == sorted((len(d) for d in pairs["document"]), reverse=True)

    stage = RerankStage(str(teacher), precision="fp32", device="cpu")
    cfg = DistillConfig(enabled=True, teacher=str(teacher), batch_size=2, precision="fp32", actors=1)
    for rescore in (False, True):
        report: dict = {}
        scored, path = distill_stage(replace(cfg, rescore=rescore), records, tmp_path / str(rescore), report)
        assert read_records(path)[1] == scored and len(scored) == 3
        for rec in scored[int(not rescore):]:
            texts = rec.positive + rec.negative
            np.testing.assert_allclose(rec.scores, stage.score([rec.query] * len(texts), texts), atol=1e-4)
        if not rescore:
            assert scored[0].scores == [9.0, 8.0, 7.0]
        facts = report["distill"]
        assert facts["dropped_without_negatives"] == 1 and facts["kept_scores"] == int(not rescore)
        assert facts["pairs"] == (4 if not rescore else 7)


def test_config_errors_name_the_key(tmp_path, tiny_bert, teacher):
    base = _overrides(tmp_path, tiny_bert, teacher)
    with pytest.raises(ConfigError, match="distill.teacher") as e:
        load_config(PipelineConfig, None, [o for o in base if not o.startswith("distill.teacher")])
    assert e.value.key == "distill.teacher"
    with pytest.raises(ConfigError, match="train.loss.distill_weight") as e:
        load_config(PipelineConfig, None, [o for o in base if not o.startswith("train.loss.distill_weight")])
    assert e.value.key == "train.loss.distill_weight"
    assert load_config(PipelineConfig, None, [o for o in base if not o.startswith("train.loss.distill_weight")]
                       + ["train.loss.name=distill"]).train.loss.name == "distill"
    with pytest.raises(ConfigError, match="mining.enabled") as e:
        load_config(PipelineConfig, None, base + ["mining.enabled=false"])
    assert e.value.key == "mining.enabled"
    with pytest.raises(ConfigError, match="distill.precision"):
        load_config(PipelineConfig, None, base + ["distill.precision=fp8"])
    # off by default, and then no teacher is needed
    assert not load_config(PipelineConfig, None, []).distill.enabled


@pytest.mark.parametrize("what", ["missing", "embedder", "plain"])
def test_a_teacher_that_is_not_a_reranker_stops_the_pipeline_before_it_starts(tmp_path, tiny_bert, teacher, what):
    from distributed_ir.pipeline import run_pipeline

    if what == "embedder":  # a saved embedder: a settings file without a reranker section
        from distributed_ir.config import ModelConfig
        from distributed_ir.models.embedder import Embedder

        Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert))).save(tmp_path / "emb")
    folder = {"missing": tmp_path / "nowhere", "embedder": tmp_path / "emb", "plain": tiny_bert}[what]
    cfg = load_config(PipelineConfig, None, _overrides(tmp_path, tiny_bert, teacher, f"distill.teacher={folder}"))
    with pytest.raises(ConfigError, match="distill.teacher") as e:
        run_pipeline(cfg)
    assert e.value.key == "distill.teacher" and not (tmp_path / "out").exists()
