"""Config loading: every project config (jobs/configs/*.yaml) loads strictly; bad keys, types and values fail clearly.

cluster/ holds Ray launcher YAML, KubeRay manifests and a runtime_env, not project configs: they are
checked with Ray's own validator and structural checks in tests/test_cluster_configs.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distributed_ir.config import PipelineConfig, TrainConfig
from distributed_ir.config_loader import ConfigError, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _config_class(path: Path):
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return PipelineConfig if ("train" in data or "dataset" in data) else TrainConfig


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").rglob("*.y*ml")), ids=lambda p: p.name)
def test_every_job_config_loads(path):
    import yaml

    cfg = to_dict(load_config(_config_class(path), path))

    def leaves(node: dict, prefix: str = ""):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]

    # every value the file sets arrives in the loaded config, under the same key
    for key, value in leaves(yaml.safe_load(path.read_text())):
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert got == value and (type(got) is type(value) or (type(value), type(got)) == (int, float)), key


def test_there_are_job_configs():
    assert list((REPO / "jobs" / "configs").glob("*.yaml"))
    # every other YAML in jobs/ would be silently skipped above: there must be none
    assert not [p for p in (REPO / "jobs").rglob("*.y*ml") if "configs" not in p.relative_to(REPO / "jobs").parts]


def test_overrides_are_typed():
    cfg = load_config(PipelineConfig, None, ["train.optim.lr=1e-4", "train.epochs=3", "train.bf16=true",
                                             "train.model.pooling=cls", "eval.top_k=10"])
    assert cfg.train.optim.lr == pytest.approx(1e-4)
    assert cfg.train.epochs == 3 and cfg.train.bf16 is True and cfg.train.model.pooling == "cls"
    assert cfg.eval.top_k == 10


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train\.optim\.lrr"):
        load_config(PipelineConfig, bad)


def test_wrong_type_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: three\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*epochs.*expected int"):
        load_config(TrainConfig, bad)
    with pytest.raises(ConfigError, match="bf16.*true/false"):
        load_config(TrainConfig, None, ["bf16=maybe"])


@pytest.mark.parametrize("override, message", [
    ("model.pooling=max", "pooling"),
    ("model.query_instruction=query:", "needs exactly one '{}'"),
    ("optim.scheduler=step", "scheduler"),
    ("batch_size=0", "batch_size"),
    ("loss.name=hinge", "loss.name"),
])
def test_invalid_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, "/nonexistent/x.yaml")


def test_string_overrides_keep_the_text_as_typed():
    cfg = load_config(PipelineConfig, None, ["train.model.query_instruction=query: {}", "dataset=2019",
                                             "train.model.document_instruction={}"])
    assert cfg.train.model.query_instruction == "query: {}" and cfg.dataset == "2019"
    assert cfg.train.model.document_instruction == "{}"


@pytest.mark.parametrize("override", ["train.optim.lr=nan", "train.optim.lr=inf", "train.epochs=[1"])
def test_non_finite_or_unparsable_values(override):
    with pytest.raises(ConfigError, match="train"):
        load_config(PipelineConfig, None, [override])


def test_pipeline_reranker_section_defaults_and_overrides():
    cfg = load_config(PipelineConfig, None, [])
    assert cfg.reranker.enabled is False  # existing pipelines are unchanged
    cfg = load_config(PipelineConfig, None, ["reranker.enabled=true", "reranker.train.loss.temperature=0.5",
                                             "reranker.train.epochs=2", "reranker.fuse=0.3"])
    t = cfg.reranker.train
    # keys left out keep the reranker's defaults, not TrainConfig's embedder defaults
    assert t.task == "cross_encoder" and t.loss.name == "listwise" and t.loss.temperature == 0.5
    assert t.model.name_or_path == "finetuned" and t.epochs == 2 and t.num_negatives == 7
    assert cfg.train.task == "embedder" and cfg.train.loss.name == "infonce" and cfg.train.model.name_or_path == "default"
    assert cfg.reranker.fuse == pytest.approx(0.3) and cfg.reranker.mining.rank_end == 30


@pytest.mark.parametrize("override, message", [
    ("reranker.train.task=embedder", r"reranker\.train\.task='embedder' is not a reranker; expected one of "
                                     "cross_encoder, colbert, llm_reranker"),
    ("reranker.train.loss.name=infonce", r"loss\.name='infonce' is not a loss for task=cross_encoder; use listwise or bce"),
    ("reranker.train.loss.name=cosent", "is not a loss for task=cross_encoder"),
    ("reranker.train.train_path=x.jsonl", "mines the reranker's records itself"),
    ("reranker.fuse=1.5", r"fusion weight must be in \[0, 1\]"),
    ("reranker.precision=int4", "reranker.precision"),
    ("reranker.min_cosine=1.5", r"reranker\.min_cosine=1\.5: expected a value in \(0, 1\]"),
    ("reranker.mining.rank_end=0", "rank_start < rank_end"),
])
def test_invalid_pipeline_reranker_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, None, [override])


def test_pipeline_reranker_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: scifact\nreranker:\n  enabled: true\n  train:\n    task: colbert\n    loss:\n"
                   "      name: bce\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:7: field 'reranker\.train\.loss\.name'.*task=colbert; use listwise"):
        load_config(PipelineConfig, bad)
    bad.write_text("reranker:\n  enabled: true\n  top_k: 200\neval:\n  top_k: 100\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: field 'reranker\.top_k'.*only rerank what the fine-tuned"):
        load_config(PipelineConfig, bad)


@pytest.mark.parametrize("task, name, temperature", [("embedder", "infonce", 0.05), ("cross_encoder", "listwise", 1.0),
                                                     ("llm_reranker", "listwise", 1.0), ("colbert", "listwise", 0.05)])
def test_loss_defaults_follow_the_task_in_train_and_pipeline_alike(tmp_path, task, name, temperature):
    """One rule (LOSS_DEFAULTS): a config without a `loss` section gets the task's loss and temperature,
    whether it is run by `train reranker` / `train embedder` or as the pipeline's reranker stage."""
    (tmp_path / "train.yaml").write_text(f"task: {task}\nbatch_size: 4\n")
    train = load_config(TrainConfig, tmp_path / "train.yaml")
    if task != "embedder":
        (tmp_path / "pipe.yaml").write_text(f"reranker:\n  enabled: true\n  train:\n    task: {task}\n")
        piped = load_config(PipelineConfig, tmp_path / "pipe.yaml").reranker.train
    else:
        piped = load_config(PipelineConfig, None, []).train
    for cfg in (train, piped):
        assert (cfg.loss.name, cfg.loss.temperature) == (name, temperature)
    # an explicit choice is kept, never rewritten
    kept = load_config(TrainConfig, None, [f"task={task}", "loss.temperature=0.3"])
    assert kept.loss.temperature == 0.3 and kept.loss.name == name


def test_a_loss_the_task_cannot_train_with_is_refused_not_rewritten():
    with pytest.raises(ConfigError, match=r"loss\.name='infonce' is not a loss for task=cross_encoder"):
        load_config(TrainConfig, None, ["task=cross_encoder", "loss.name=infonce"])
    with pytest.raises(ConfigError, match=r"loss\.name='listwise' is not a loss for task=embedder"):
        load_config(TrainConfig, None, ["loss.name=listwise"])


@pytest.mark.parametrize("key, value, line", [("dataset", "../x", 1), ("eval_split", "../../etc/passwd", 2),
                                              ("train_split", "a/b", 3), ("dataset", "..", 1), ("eval_split", ".", 2)])
def test_dataset_and_split_names_cannot_leave_the_data_folder(tmp_path, key, value, line):
    """Names joined into paths (data_dir/<dataset>, qrels/<split>.tsv) are one plain path component."""
    text = {"dataset": "scifact", "eval_split": "test", "train_split": "train", key: value}
    bad = tmp_path / "bad.yaml"
    bad.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in text.items()))
    with pytest.raises(ConfigError, match=rf"bad\.yaml:{line}: field '{key}'.*{re.escape(repr(value))}") as err:
        load_config(PipelineConfig, bad)
    assert err.value.key == key
    with pytest.raises(ConfigError, match=key):  # a command-line override too
        load_config(PipelineConfig, None, [f"{key}={value}"])
    ok = load_config(PipelineConfig, None, ["dataset=cqadupstack.en-v1_2", "eval_split=dev"])
    assert (ok.dataset, ok.eval_split) == ("cqadupstack.en-v1_2", "dev")
