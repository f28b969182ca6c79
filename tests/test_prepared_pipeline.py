"""The whole pipeline (mine -> train on Ray Train -> encode -> search -> evaluate -> report) on
T2Ranking and Wikipedia-NQ prepared from public-format fixtures, with a tiny BERT."""

from __future__ import annotations

import json

import pytest

from distributed_ir.config import PipelineConfig
from distributed_ir.config_loader import load_config
from distributed_ir.data.nq import prepare_nq
from distributed_ir.data.t2ranking import prepare_t2ranking
from distributed_ir.pipeline import run_pipeline
from distributed_ir.report import LOSS_PNG, METRICS_PNG
from tests.public_fixtures import write_nq, write_t2ranking


def _run(tmp_path, tiny_bert, dataset: str, extra: list[str]) -> dict:
    out = tmp_path / "out"
    cfg = load_config(PipelineConfig, None, [
        f"data_dir={tmp_path / 'data'}", f"dataset={dataset}", "train_split=train", "eval_split=dev",
        f"output_dir={out}", f"train.model.name_or_path={tiny_bert}", "train.model.query_max_length=16",
        "train.model.document_max_length=64", "train.scaling.num_workers=1", "train.scaling.cpus_per_worker=1",
        "train.scaling.torch_threads=1", "train.batch_size=2", "train.max_steps=3", "train.log_every=1",
        "train.optim.lr=1e-3", "eval.batch_size=16", "eval.top_k=10", *extra])
    report = run_pipeline(cfg)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == report["metrics"]
    assert report["train"]["step"] == 3
    # the report got the training history through Ray Train (rank 0's train_loop return value)
    text = (out / "report.md").read_text()
    assert "3 logged steps, step 1 to 3" in text and (out / LOSS_PNG).is_file() and (out / METRICS_PNG).is_file()
    assert len((out / "run.trec").read_text().splitlines()) == report["metrics"]["finetuned"]["num_queries"] * 10
    return report


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_on_prepared_t2ranking(tmp_path, tiny_bert, ray_cluster):
    write_t2ranking(tmp_path / "raw")
    stats = prepare_t2ranking(tmp_path / "raw", tmp_path / "data" / "t2ranking")
    report = _run(tmp_path, tiny_bert, "t2ranking", [])
    assert report["train"]["records"] == stats["train_pairs"] == 6
    assert report["metrics"]["base"]["num_queries"] == report["metrics"]["finetuned"]["num_queries"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_on_prepared_nq_with_mining(tmp_path, tiny_bert, ray_cluster):
    write_nq(tmp_path / "raw")
    stats = prepare_nq(tmp_path / "raw", tmp_path / "data" / "nq", num_shards=2)
    report = _run(tmp_path, tiny_bert, "nq", ["mining.enabled=true", "mining.rank_start=1", "mining.rank_end=8",
                                              "mining.per_query=2", "train.num_negatives=1"])
    assert report["mining"]["queries"] == stats["qrels_train"]["written"] - 1 == 6  # train-0 has 2 positives
    assert report["train"]["records"] == 6
    assert report["metrics"]["finetuned"]["num_queries"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_trains_on_prepared_dpr_triplets(tmp_path, tiny_bert, ray_cluster):
    """train.train_path = the prepared records (DPR's own hard negatives) instead of qrels pairs/mining."""
    write_nq(tmp_path / "raw")
    stats = prepare_nq(tmp_path / "raw", tmp_path / "data" / "nq", num_shards=2)
    triplets = tmp_path / "data" / "nq" / "train_triplets.jsonl"
    report = _run(tmp_path, tiny_bert, "nq", [f"train.train_path={triplets}", "train.num_negatives=1",
                                              "skip_base_eval=true"])
    assert report["train"]["records"] == stats["train_triplets"] > 0
    assert "base" not in report["metrics"]
    with pytest.raises(Exception, match="exclusive"):
        run_pipeline(load_config(PipelineConfig, None, [f"data_dir={tmp_path / 'data'}", "dataset=nq",
                                                        "train_split=train", "eval_split=dev",
                                                        f"train.train_path={triplets}", "mining.enabled=true",
                                                        f"output_dir={tmp_path / 'x'}",
                                                        f"train.model.name_or_path={tiny_bert}"]))
