"""Training through the CLI on a real local Ray cluster (2 Ray Train workers, gloo), then resume."""

from __future__ import annotations

import numpy as np
import pytest

from distributed_ir.models.embedder import Embedder
from tests.conftest import last_json, run_cli, triplets


@pytest.mark.slow
@pytest.mark.ray
def test_train_embedder_on_two_ray_workers_and_resume(tiny_bert, tmp_path):
    from distributed_ir.data.records import write_records

    write_records(tmp_path / "train.jsonl", triplets(32))
    (tmp_path / "cfg.yaml").write_text(
        f"train_path: {tmp_path / 'train.jsonl'}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        f"model: {{name_or_path: {tiny_bert}, query_max_length: 16, document_max_length: 24}}\n"
        "scaling: {num_workers: 2, cpus_per_worker: 0.5, torch_threads: 1}\n"
        "optim: {lr: 1.0e-3}\n"
        "batch_size: 4\nnum_negatives: 1\nmax_steps: 4\nlog_every: 2\ncheckpoint_every: 2\n"
    )
    first = run_cli("train", "embedder", "--config", "cfg.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = last_json(first.stdout)
    assert summary["step"] == 4 and summary["total_steps"] == 4
    log = first.stdout + first.stderr
    assert "2 worker(s) x batch 4" in log and "step 4/4" in log
    model = tmp_path / "out" / "model"
    assert model.joinpath("modules.json").is_file()
    # the exported model is what rank 0 trained: loadable by sentence-transformers, same vectors
    from sentence_transformers import SentenceTransformer

    texts = ["cats purr", "rockets reach orbit"]
    np.testing.assert_allclose(SentenceTransformer(str(model), device="cpu").encode(texts),
                               Embedder.load(model).encode(texts), atol=1e-5)
    # resume from the final checkpoint and train 2 more steps (max_steps raised to 6)
    again = run_cli("train", "embedder", "--config", "cfg.yaml", "max_steps=6",
                    f"resume_from={tmp_path / 'out' / 'final_checkpoint'}", f"output_dir={tmp_path / 'out2'}",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "start step 4" in again.stdout + again.stderr
    assert last_json(again.stdout)["step"] == 6


def test_cli_reports_config_errors(tmp_path):
    (tmp_path / "cfg.yaml").write_text("train_path: x.jsonl\nbatch_sise: 4\n")
    res = run_cli("train", "embedder", "--config", "cfg.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "unknown config key(s) batch_sise" in res.stderr
