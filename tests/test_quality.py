"""Real all-MiniLM-L6-v2 on a SciFact subset: a short Ray Train fine-tune beats the base model.

Subset (to stay fast on 2 cores): the first 200 train queries, the first 100 test queries, their
relevant documents and 500 other documents. The pipeline mines hard negatives with the base
model, trains 2 Ray Train workers with cross-worker negatives, and evaluates both models.
"""

from __future__ import annotations

import json
import random

import pytest

from distributed_ir.config import PipelineConfig
from distributed_ir.config_loader import load_config
from distributed_ir.data.beir import load_beir
from distributed_ir.pipeline import run_pipeline
from tests.conftest import REPO


def _subset(src, dst, n_train=200, n_test=100, n_other=500):
    train, test = load_beir(src, "train"), None
    test = load_beir(src, "test", base=train)
    tq = list(train.split_queries())[:n_train]
    eq = list(test.split_queries())[:n_test]
    keep = {d for q in tq for d in train.qrels[q]} | {d for q in eq for d in test.qrels[q]}
    others = [d for d in train.corpus if d not in keep]
    keep |= set(random.Random(0).sample(others, n_other))
    (dst / "qrels").mkdir(parents=True)
    with (dst / "corpus.jsonl").open("w") as fh:
        for d in train.corpus:
            if d in keep:
                fh.write(json.dumps({"_id": d, "text": train.corpus[d]}) + "\n")
    with (dst / "queries.jsonl").open("w") as fh:
        for q in tq + eq:
            fh.write(json.dumps({"_id": q, "text": train.queries[q]}) + "\n")
    for split, ds, qs in (("train", train, tq), ("test", test, eq)):
        with (dst / "qrels" / f"{split}.tsv").open("w") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for q in qs:
                for d, r in ds.qrels[q].items():
                    fh.write(f"{q}\t{d}\t{r}\n")


@pytest.mark.slow
@pytest.mark.ray
def test_short_finetune_beats_base(scifact_dir, tmp_path, ray_cluster):
    _subset(scifact_dir, tmp_path / "data" / "scifact")
    cfg = load_config(PipelineConfig, REPO / "jobs" / "configs" / "scifact_minilm.yaml", [
        f"data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}",
        "train.max_steps=8", "train.batch_size=8", "train.log_every=4", "train.checkpoint_every=0",
        "train.optim.warmup_ratio=0.0", "reranker.enabled=false",  # the embedder's quality only
    ])
    report = run_pipeline(cfg)
    base, tuned = report["metrics"]["base"], report["metrics"]["finetuned"]
    print(json.dumps(report["metrics"], indent=2))
    assert base["num_queries"] == tuned["num_queries"] == 100
    assert 0.5 < base["ndcg@10"] < 0.95
    assert tuned["ndcg@10"] > base["ndcg@10"]
    assert report["mining"]["negatives"] > 0
    # the shipped config's sparse rows: BM25 alone and fused with the fine-tuned dense run
    assert report["metrics"]["bm25"]["num_queries"] == report["metrics"]["hybrid"]["num_queries"] == 100
    assert (tmp_path / "out" / "run.trec").is_file()
