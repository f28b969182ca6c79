"""Reranker training through the shared loop: tasks, losses, Ray Train via the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.data.records import write_records
from distributed_ir.models.rerankers import load_reranker
from distributed_ir.train.batching import TextBatch
from distributed_ir.train.loop import train_loop
from distributed_ir.train.tasks import get_task
from distributed_ir.train.tasks.reranker import group_pairs
from tests.conftest import last_json, reranker_loop_config, run_cli, triplets


def test_group_pairs_layout():
    batch = TextBatch(["q1", "q2"], ["p1", "p2"], ["n11", "n12", "n21", "n22"])
    queries, docs, group = group_pairs(batch)
    assert group == 3 and docs == ["p1", "n11", "n12", "p2", "n21", "n22"]
    assert queries == ["q1"] * 3 + ["q2"] * 3


@pytest.mark.parametrize("task, loss", [("cross_encoder", "listwise"), ("cross_encoder", "bce"),
                                        ("colbert", "listwise")])
def test_reranker_loss_falls_and_export_scores(tiny_bert, tmp_path, task, loss):
    write_records(tmp_path / "train.jsonl", triplets(16))
    # pointwise BCE first learns the class prior (1 positive : 2 negatives): it needs a longer schedule
    epochs, lr = (16, 3e-3) if loss == "bce" else (8, 1e-3)
    cfg = reranker_loop_config(tiny_bert, tmp_path, task, epochs=epochs, optim={"lr": lr, "warmup_ratio": 0.0},
                               loss={"name": loss, "temperature": 1.0 if task != "colbert" else 0.05})
    result = train_loop(cfg)
    losses = [m["loss"] for m in result["history"]]
    assert len(losses) == epochs * 4 and sum(losses[-4:]) < sum(losses[:4])
    model = load_reranker(tmp_path / "out" / "checkpoints" / "final" / "model")
    assert model.kind == task
    # trained: positives outrank their negatives on the training triplets
    recs = triplets(16)
    pos = model.score_pairs([r.query for r in recs], [r.positive[0] for r in recs])
    neg = model.score_pairs([r.query for r in recs], [r.negative[0] for r in recs])
    assert (pos > neg).mean() >= 0.75


def _first_step_moves(cfg: TrainConfig, head_of) -> tuple[float, float]:
    """Largest |change| of the head's and of the body's weights after one real optimizer step.
    AdamW's first step moves every weight by about lr (m/sqrt(v) = sign(g)), so these read the
    learning rate each group really trained with."""
    from distributed_ir.train.engines import build_engine

    task = get_task(cfg)
    module = task.build()
    head = {id(p) for p in head_of(module)}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    engine = build_engine(cfg, module, task.param_groups(module), torch.device("cpu"), 1, total_steps=10)
    recs = triplets(4)
    batch = TextBatch([r.query for r in recs], [r.positive[0] for r in recs], [n for r in recs for n in r.negative])
    engine.train_step(task.inputs(module, batch), boundary=True)
    moves = {n: float((p.detach() - before[n]).abs().max()) for n, p in module.named_parameters()}
    named = dict(module.named_parameters())
    return (max(v for n, v in moves.items() if id(named[n]) in head),
            max(v for n, v in moves.items() if id(named[n]) not in head))


def test_colbert_head_has_its_own_learning_rate(tiny_bert, tmp_path):
    cfg = from_dict(TrainConfig, reranker_loop_config(
        tiny_bert, tmp_path, "colbert", reranker={"head_lr": 1e-2, "colbert_dim": 8},
        optim={"lr": 1e-4, "warmup_ratio": 0.0, "max_grad_norm": 0.0}))
    head, body = _first_step_moves(cfg, lambda m: m.reranker.colbert_linear.parameters())
    assert head == pytest.approx(1e-2, rel=0.05) and body == pytest.approx(1e-4, rel=0.05)


def test_cross_encoder_head_has_its_own_learning_rate(tiny_bert, tmp_path):
    cfg = from_dict(TrainConfig, reranker_loop_config(
        tiny_bert, tmp_path, "cross_encoder", reranker={"head_lr": 1e-3},
        optim={"lr": 1e-5, "warmup_ratio": 0.0, "max_grad_norm": 0.0}))
    head, body = _first_step_moves(cfg, lambda m: [p for x in (m.reranker.model.classifier, m.reranker.model.bert.pooler)
                                                   for p in x.parameters()])
    assert head == pytest.approx(1e-3, rel=0.05) and body == pytest.approx(1e-5, rel=0.05)


def test_wrong_loss_or_format_is_refused(tiny_bert, tmp_path):
    from distributed_ir.config_loader import ConfigError

    with pytest.raises(ConfigError, match="is not a loss for task=colbert"):
        get_task(from_dict(TrainConfig, reranker_loop_config(tiny_bert, tmp_path, "colbert", loss={"name": "bce"})))
    write_records(tmp_path / "train.jsonl", [r.__class__(r.query, r.positive) for r in triplets(8)])
    with pytest.raises(ValueError, match="needs triplet records"):
        train_loop(reranker_loop_config(tiny_bert, tmp_path, "cross_encoder"))


def test_one_task_class_per_task_and_the_config_knows_them_all():
    from distributed_ir.config import LOSS_DEFAULTS, RERANKER_TASKS, TASK_LOSSES
    from distributed_ir.models.rerankers import RERANKER_CLASSES
    from distributed_ir.train.tasks import TASKS

    assert set(TASKS) == set(LOSS_DEFAULTS) == set(TASK_LOSSES) == {"embedder", *RERANKER_TASKS}
    assert tuple(RERANKER_CLASSES) == RERANKER_TASKS
    assert [TASKS[name].model_class for name in RERANKER_TASKS] == [RERANKER_CLASSES[n] for n in RERANKER_TASKS]
    assert len({TASKS[name] for name in TASKS}) == len(TASKS)


@pytest.mark.parametrize("task, kw, key", [
    ("cross_encoder", {"lora": {"enabled": True}}, "lora.enabled"),
    ("colbert", {"lora": {"enabled": True}}, "lora.enabled"),
    ("llm_reranker", {"lora": {"enabled": True, "export": "adapter"}}, "lora.export"),
    ("llm_reranker", {"reranker": {"head_lr": 1e-3}}, "reranker.head_lr"),
])
def test_a_setting_the_task_cannot_use_is_refused_by_key(tiny_bert, tmp_path, task, kw, key):
    from distributed_ir.config_loader import ConfigError

    with pytest.raises(ConfigError) as err:
        get_task(from_dict(TrainConfig, reranker_loop_config(tiny_bert, tmp_path, task, **kw)))
    assert err.value.key == key


@pytest.mark.slow
@pytest.mark.ray
def test_train_rerankers_on_ray_train_and_rerank_with_llm(tiny_bert, tiny_qwen, tmp_path):
    """cross-encoder, ColBERT (2 workers) and a LoRA LLM reranker (1 worker) through the CLI."""
    write_records(tmp_path / "train.jsonl", triplets(16))
    common = (f"train_path: {tmp_path / 'train.jsonl'}\n"
              "scaling: {num_workers: 2, cpus_per_worker: 0.5, torch_threads: 1}\n"
              "optim: {lr: 1.0e-3}\nbatch_size: 4\nnum_negatives: 2\nmax_steps: 2\nlog_every: 1\n")
    configs = {
        "cross_encoder": f"task: cross_encoder\nmodel: {{name_or_path: {tiny_bert}}}\nloss: {{name: listwise, temperature: 1.0}}\n"
                         "reranker: {max_length: 64}\n",
        "colbert": f"task: colbert\nmodel: {{name_or_path: {tiny_bert}}}\nloss: {{name: listwise, temperature: 0.05}}\n"
                   "reranker: {query_max_length: 16, document_max_length: 24, colbert_dim: 16, head_lr: 1.0e-2}\n",
        "llm_reranker": f"task: llm_reranker\nmodel: {{name_or_path: {tiny_qwen}}}\nloss: {{name: listwise, temperature: 1.0}}\n"
                        "reranker: {max_length: 320}\nlora: {enabled: true, r: 4, alpha: 8}\n",
    }
    for task, text in configs.items():
        cfg_text = common + text + f"output_dir: {tmp_path / task}\n"
        if task == "llm_reranker":
            cfg_text = cfg_text.replace("num_workers: 2", "num_workers: 1")
        (tmp_path / f"{task}.yaml").write_text(cfg_text)
        res = run_cli("train", "reranker", "--config", f"{task}.yaml", cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        summary = last_json(res.stdout)
        assert summary["step"] == 2
        assert f"task {task}" in res.stdout + res.stderr
        model = load_reranker(tmp_path / task / "model")
        scores = model.score("what about cats", ["cats purr and sleep", "rockets reach orbit"])
        assert len(scores) == 2 and np.all(np.isfinite(scores))
    # the LoRA LLM reranker exported merged weights: no adapter left, and the training is in them
    from distributed_ir.models.llm_reranker import LLMReranker

    llm = load_reranker(tmp_path / "llm_reranker" / "model")
    assert not any("lora" in n for n, _ in llm.named_parameters())
    base = LLMReranker.from_pretrained(str(tiny_qwen), settings=llm.settings)
    pairs = (["what about cats"] * 2, ["cats purr and sleep", "rockets reach orbit"])
    assert np.abs(np.asarray(llm.score_pairs(*pairs)) - np.asarray(base.score_pairs(*pairs))).max() > 1e-4


@pytest.mark.slow
def test_llm_reranker_on_deepspeed_matches_ddp(tiny_qwen, tmp_path):
    """LoRA LLM reranker, world size 1: the DeepSpeed ZeRO-2 engine follows DDP's fp32 losses."""
    write_records(tmp_path / "train.jsonl", triplets(16))
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    losses = {}
    for name, engine in (("ddp", {"name": "ddp"}), ("zero2", {"name": "deepspeed", "zero_stage": 2})):
        result = train_loop(reranker_loop_config(tiny_qwen, tmp_path, "llm_reranker", max_steps=3, lora=lora,
                                                 engine=engine, output_dir=str(tmp_path / name),
                                                 optim={"lr": 2e-3, "warmup_ratio": 0.0}))
        losses[name] = [m["loss"] for m in result["history"]]
    assert len(losses["ddp"]) == 3
    np.testing.assert_allclose(losses["zero2"], losses["ddp"], atol=1e-4)
    model = load_reranker(tmp_path / "zero2" / "checkpoints" / "final" / "model")
    assert len(model.score("what about cats", ["cats purr", "rockets fly"])) == 2
