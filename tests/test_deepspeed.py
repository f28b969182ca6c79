"""DeepSpeed engine and LoRA LLM embedders: the same loop, losses and checkpoints as DDP.

- 2 Ray Train workers (gloo) on a tiny Qwen2 with LoRA: DDP, ZeRO-2 and ZeRO-3 follow the same
  fp32 loss trajectory for the same seed and data, and export the same merged model.
- ZeRO-3's export equals the parameters gathered from the engine.
- A saved adapter, loaded and merged, encodes like the trained (unmerged) model.
- A DeepSpeed checkpoint resumes a run exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict, to_dict
from distributed_ir.data.records import write_records
from distributed_ir.models.embedder import LLM_QUERY_INSTRUCTION, Embedder
from distributed_ir.train.loop import train_loop
from distributed_ir.train.tasks import get_task
from tests.conftest import REPO, build_tiny_model, reranker_loop_config, run_cli, triplets

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", padding_side="left")


def _cfg(model, tmp_path, out, **kw) -> TrainConfig:
    base = {"train_path": str(tmp_path / "train.jsonl"), "output_dir": str(out),
            "model": {"name_or_path": str(model), "query_max_length": 16, "document_max_length": 24},
            "batch_size": 4, "log_every": 1, "num_negatives": 1, "seed": 5,
            "optim": {"lr": 2e-3, "warmup_ratio": 0.0}, "lora": LORA}
    base.update(kw)
    return from_dict(TrainConfig, base)


def test_llm_embedder_defaults_come_from_the_backbone(tiny_qwen2, tiny_bert):
    llm = Embedder.load(tiny_qwen2)
    assert (llm.settings.pooling, llm.settings.append_eos) == ("last", True)
    assert llm.settings.query_instruction == LLM_QUERY_INSTRUCTION
    assert llm.format(["q"], "query") == [LLM_QUERY_INSTRUCTION.replace("{}", "q")]
    ids = llm.tokenize(["short", "a much longer document text"], "document")["input_ids"]
    assert (ids[:, -1] == llm.tokenizer.eos_token_id).all()  # left padding: EOS is the last real token
    assert Embedder.load(tiny_bert).settings.pooling == "mean"  # encoders keep mean pooling


@pytest.mark.slow
@pytest.mark.ray
def test_ddp_zero2_zero3_same_lora_trajectory_on_two_ray_workers(tiny_qwen2, tmp_path, ray_cluster):
    from distributed_ir.train.launch import run_training

    write_records(tmp_path / "train.jsonl", triplets(32))
    runs = {}
    for name, engine in [("ddp", {"name": "ddp"}), ("zero2", {"name": "deepspeed", "zero_stage": 2}),
                         ("zero3", {"name": "deepspeed", "zero_stage": 3})]:
        cfg = _cfg(tiny_qwen2, tmp_path, tmp_path / name, engine=engine, max_steps=4, checkpoint_every=4,
                   scaling={"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1})
        result = run_training(cfg)
        history = json.loads((tmp_path / name / "final_checkpoint" / "history.json").read_text())
        runs[name] = {"loss": [m["loss"] for m in history], "model": result.model_path,
                      "state_mb": history[-1]["state_mb"]}
    ref = runs["ddp"]["loss"]
    assert len(ref) == 4 and len(set(ref)) == 4  # 4 different batches: a trajectory, not a constant
    for name in ("zero2", "zero3"):
        np.testing.assert_allclose(runs[name]["loss"], ref, atol=1e-4, rtol=0, err_msg=name)
    # the exported (merged) models agree too, and ZeRO-3 holds less per worker
    texts = ["cats purr and sleep", "rockets reach orbit"]
    vecs = {n: Embedder.load(r["model"]).encode(texts, "query") for n, r in runs.items()}
    for name in ("zero2", "zero3"):
        np.testing.assert_allclose(vecs[name], vecs["ddp"], atol=1e-4)
    assert runs["zero3"]["state_mb"] < runs["ddp"]["state_mb"]


@pytest.fixture(scope="module")
def tiny_tied_lm(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_tied_lm"), "qwen2_lm", tie_word_embeddings=True)


@pytest.mark.parametrize("task_name", ["embedder", "llm_reranker"])
def test_zero3_export_equals_gathered_parameters(tiny_qwen2, tiny_tied_lm, tmp_path, task_name):
    """World size 1 without Ray: ZeRO-3 partitions, the export gathers.  Its keys are those of the
    same module built without ZeRO (a tied LM head included), its values those of the engine's
    state_dict() taken inside one gather of every parameter."""
    import deepspeed

    from distributed_ir.train.engines import DeepSpeedEngine, deepspeed_config, init_deepspeed_distributed

    write_records(tmp_path / "train.jsonl", triplets(16))
    if task_name == "embedder":  # LoRA on a Qwen2Model, adapter export
        cfg = _cfg(tiny_qwen2, tmp_path, tmp_path / "out", engine={"name": "deepspeed", "zero_stage": 3},
                   lora={**LORA, "export": "adapter"})
    else:  # full fine-tune of a causal LM whose head is tied to its input embeddings
        cfg = from_dict(TrainConfig, reranker_loop_config(tiny_tied_lm, tmp_path, "llm_reranker",
                                                          engine={"name": "deepspeed", "zero_stage": 3}))
    task = get_task(cfg)
    plain_keys = set(task.build().state_dict())
    ds = deepspeed_config(cfg, 1)
    init_deepspeed_distributed("gloo")
    with DeepSpeedEngine.init_context(ds):
        module = task.build()
    engine = DeepSpeedEngine(cfg, module, task.param_groups(module), torch.device("cpu"), 1, 4, ds)
    for batch in list(_batches(task, engine, 2)):
        engine.train_step(batch, boundary=True)
    assert any(getattr(p, "ds_numel", 0) and p.numel() == 0 for p in engine.inner.parameters())  # partitioned
    full = engine.full_state_dict(rank=0)
    with deepspeed.zero.GatheredParameters(list(engine.inner.parameters()), modifier_rank=None):
        direct = {n: v.detach().clone() for n, v in engine.inner.state_dict().items()}
    assert full.keys() == plain_keys == direct.keys()
    for name, value in direct.items():
        torch.testing.assert_close(full[name], value, atol=0, rtol=0, msg=name)
    export = task.build()
    export.load_state_dict(full)
    if task_name == "llm_reranker":
        head = "reranker.lm.lm_head.weight"
        assert head in full and not torch.equal(full[head], task.build().state_dict()[head])  # trained
        return
    task.export(export, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora = {n: v for n, v in direct.items() if "lora_" in n}
    assert len(saved) == len(lora) > 0
    for name, value in lora.items():
        key = name.removeprefix("embedder.backbone.").replace(".default", "")
        torch.testing.assert_close(saved[key], value, atol=0, rtol=0)


def _batches(task, engine, n):
    from distributed_ir.data.records import read_records
    from distributed_ir.train.batching import epoch_batches

    _, records = read_records(task.cfg.train_path)
    for i, batch in enumerate(epoch_batches(records, 0, 0, 1, 4, 1, seed=1)):
        if i == n:
            return
        yield task.inputs(engine.inner, batch)


def test_adapter_export_loads_merged_and_encodes_like_the_trained_model(tiny_qwen2, tmp_path):
    write_records(tmp_path / "train.jsonl", triplets(16))
    cfg = _cfg(tiny_qwen2, tmp_path, tmp_path / "out", max_steps=3, lora={**LORA, "export": "adapter"})
    train_loop(to_dict(cfg))
    final = tmp_path / "out" / "checkpoints" / "final"
    assert (final / "model" / "adapter_config.json").is_file()
    assert not (final / "model" / "model.safetensors").exists()  # the adapter only, not the base
    # the trained model: base + LoRA (unmerged) with the checkpoint's trainable weights
    trained = get_task(cfg).build()
    trained.load_state_dict(load_file(final / "trainable.safetensors"), strict=False)
    assert float(trained.embedder.backbone.base_model.model.layers[0].self_attn.q_proj.lora_B["default"]
                 .weight.abs().sum()) > 0  # LoRA B starts at zero: training moved it
    texts = ["bees make honey", "what about chess", "trains run on rails every day"]
    loaded = Embedder.load(final / "model")  # base from adapter_config.json, adapter merged
    assert not hasattr(loaded.backbone, "peft_config")
    for kind in ("query", "document"):
        np.testing.assert_allclose(loaded.encode(texts, kind), trained.embedder.encode(texts, kind), atol=1e-5)
    # and the merged export of the same run encodes the same
    merged_cfg = _cfg(tiny_qwen2, tmp_path, tmp_path / "merged", max_steps=3)
    train_loop(to_dict(merged_cfg))
    merged = Embedder.load(tmp_path / "merged" / "checkpoints" / "final" / "model")
    np.testing.assert_allclose(merged.encode(texts, "query"), loaded.encode(texts, "query"), atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_resumes_exactly(tiny_qwen2, tmp_path, stage):
    write_records(tmp_path / "train.jsonl", triplets(16))
    ds = {"name": "deepspeed", "zero_stage": stage}
    straight = train_loop(to_dict(_cfg(tiny_qwen2, tmp_path, tmp_path / "a", engine=ds, max_steps=6,
                                       checkpoint_every=3)))
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000003"
    assert (ckpt / "deepspeed" / "state").is_dir()
    resumed = train_loop(to_dict(_cfg(tiny_qwen2, tmp_path, tmp_path / "b", engine=ds, max_steps=6,
                                      checkpoint_every=3, resume_from=str(ckpt))))
    # the history continues the checkpoint's (steps 1-3 read back from it), then steps 4-6 again
    assert [m["step"] for m in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([m["loss"] for m in resumed["history"]],
                               [m["loss"] for m in straight["history"]], atol=1e-6)
    final = [load_file(tmp_path / run / "checkpoints" / "final" / "model" / "model.safetensors") for run in "ab"]
    assert final[0].keys() == final[1].keys()
    for name, value in final[0].items():
        torch.testing.assert_close(final[1][name], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_llm_lora_config_runs_the_pipeline(scifact_dir, tmp_path):
    """jobs/configs/scifact_tiny_llm_lora.yaml as shipped (fewer steps/queries): ZeRO-2 + LoRA + eval."""
    import subprocess
    import sys

    model = tmp_path / "tiny_qwen2"
    subprocess.run([sys.executable, str(REPO / "jobs" / "make_tiny_llm.py"), "--out", str(model)], check=True,
                   capture_output=True)
    res = run_cli("pipeline", "--config", str(REPO / "jobs" / "configs" / "scifact_tiny_llm_lora.yaml"),
                  f"train.model.name_or_path={model}", f"output_dir={tmp_path / 'out'}", "train.max_steps=4",
                  "train.scaling.cpus_per_worker=0.5", "eval.max_queries=20", "skip_base_eval=true",
                  cwd=tmp_path, env={"IR_DATA_DIR": str(scifact_dir.parent)})
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "engine deepspeed ZeRO-2" in log and "step 4/4" in log
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["metrics"]["finetuned"]["num_queries"] == 20
    saved = json.loads((tmp_path / "out" / "train" / "model" / "distributed_ir.json").read_text())
    assert saved["settings"]["pooling"] == "last" and saved["settings"]["query_instruction"] == LLM_QUERY_INSTRUCTION
    assert saved["trained_with"] == {"task": "embedder", "engine": "deepspeed", "lora": True}


def test_zero3_llm_reranker_exports_its_tied_head(tiny_tied_lm, tmp_path):
    """ZeRO-3 full fine-tune of an LLM reranker whose LM head is tied to its embeddings (Qwen2 with
    tie_word_embeddings=True), checkpoint every step: each export holds every weight, equal to the
    fp32 weights DeepSpeed's own consolidation (zero_to_fp32) recovers from the partitioned checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from distributed_ir.models.rerankers import load_reranker

    lm = tiny_tied_lm
    write_records(tmp_path / "train.jsonl", triplets(8))
    cfg = reranker_loop_config(lm, tmp_path, "llm_reranker", max_steps=2, checkpoint_every=1, batch_size=2,
                               engine={"name": "deepspeed", "zero_stage": 3}, optim={"lr": 1e-2, "warmup_ratio": 0.0})
    train_loop(cfg)
    initial = load_file(lm / "model.safetensors")["model.embed_tokens.weight"]
    for name in ("step_0000001", "final"):
        ckpt = tmp_path / "out" / "checkpoints" / name
        model = load_reranker(ckpt / "model")
        lm_head = model.lm.get_output_embeddings().weight
        assert lm_head is model.lm.get_input_embeddings().weight
        assert not torch.equal(lm_head, initial)  # trained
        reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state")
        reference = {k.removeprefix("reranker.lm."): v for k, v in reference.items()}
        exported = model.lm.state_dict()
        assert exported.keys() == reference.keys() and "lm_head.weight" in exported
        for key, value in reference.items():
            torch.testing.assert_close(exported[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("extra, refused", [
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps, "
                                                                            "train_micro_batch_size_per_gpu"),
    ({"train_batch_size": 64}, "train_batch_size"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"bfloat16": {"enabled": True}}, "bfloat16"),
    ({"fp16": {"enabled": True, "loss_scale": 0}}, "fp16.enabled"),
    ({"fp16": True}, "fp16.enabled"),
    ({"gradient_clipping": 0.0}, "gradient_clipping"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1.0}}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
])
def test_deepspeed_config_file_cannot_override_what_the_loop_owns(tmp_path, extra, refused):
    from distributed_ir.config_loader import ConfigError
    from distributed_ir.train.engines import deepspeed_config

    file = tmp_path / "ds.json"
    file.write_text(json.dumps({**extra, "steps_per_print": 5}))
    cfg = _cfg("m", tmp_path, tmp_path, engine={"name": "deepspeed", "zero_stage": 2, "config_file": str(file)})
    with pytest.raises(ConfigError, match=f"{file}: sets {refused};"):
        deepspeed_config(cfg, 2)


@pytest.mark.ray
def test_a_clashing_config_file_fails_on_the_driver_with_its_relative_path(tmp_path, ray_cluster, monkeypatch):
    """run_training checks the file before any worker starts, and hands workers an absolute path."""
    from distributed_ir.config_loader import ConfigError
    from distributed_ir.train.launch import run_training

    write_records(tmp_path / "train.jsonl", triplets(8))
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_clipping": 5.0}))
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("m", tmp_path, tmp_path / "out", engine={"name": "deepspeed", "config_file": "ds.json"})
    with pytest.raises(ConfigError, match=r"ds\.json: sets gradient_clipping;"):
        run_training(cfg)
    assert not (tmp_path / "out" / "ray").exists()  # no Ray Train run was started


def test_deepspeed_config_file_merges_other_settings(tmp_path):
    from distributed_ir.train.engines import deepspeed_config

    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"steps_per_print": 5, "fp16": {"initial_scale_power": 8},
                                "zero_optimization": {"overlap_comm": False, "reduce_bucket_size": 1000}}))
    cfg = _cfg("m", tmp_path, tmp_path, batch_size=3, grad_accum_steps=2,
               engine={"name": "deepspeed", "zero_stage": 2, "config_file": str(file)})
    ds = deepspeed_config(cfg, 2)
    assert ds["steps_per_print"] == 5 and ds["train_batch_size"] == 3 * 2 * 2
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000}
    assert ds["fp16"] == {"enabled": False, "initial_scale_power": 8}  # loss-scale tuning, not the switch


# ---------------------------------------------------------------- every shipped engine setting vs DDP

@pytest.fixture(scope="module")
def ddp_reference(tiny_qwen2, tmp_path_factory):
    """The fp32 DDP run the DeepSpeed settings are compared with: 3 optimizer steps of 2 accumulated
    micro-batches (gradient clipping at 1.0 active: the norms are ~1.5-2), LoRA, world size 1."""
    tmp = tmp_path_factory.mktemp("ddp_reference")
    write_records(tmp / "train.jsonl", triplets(16))
    result = train_loop(to_dict(_cfg(tiny_qwen2, tmp, tmp / "out", max_steps=3, grad_accum_steps=2)))
    return tmp, result["history"], _final_weights(tmp / "out")


def _final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / "final" / "model" / "model.safetensors")


@pytest.mark.parametrize("engine", [
    {"zero_stage": 0},
    {"zero_stage": 1},
    {"zero_stage": 2, "offload_optimizer": True},  # torch_adam (default): no cpu_adam build
    {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
], ids=["zero0", "zero1", "zero2-offload-optimizer", "zero3-offload-all"])
def test_deepspeed_setting_follows_ddp(tiny_qwen2, ddp_reference, tmp_path, engine):
    """Same seed and data: the DeepSpeed run's losses, gradient norms and exported weights are DDP's."""
    data, reference, ref_weights = ddp_reference
    result = train_loop(to_dict(_cfg(tiny_qwen2, data, tmp_path / "out", max_steps=3, grad_accum_steps=2,
                                     engine={"name": "deepspeed", **engine})))
    history = result["history"]
    assert [m["step"] for m in history] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in history], [m["loss"] for m in reference], atol=1e-5, rtol=0)
    np.testing.assert_allclose([m["grad_norm"] for m in history], [m["grad_norm"] for m in reference], rtol=1e-4)
    weights = _final_weights(tmp_path / "out")
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, atol=1e-5, rtol=0, msg=name)


def test_deepspeed_fp16_follows_fp32(tiny_qwen2, ddp_reference, tmp_path):
    """ZeRO-2 fp16 (half weights, dynamic loss scaling) on the reference data: fp32's losses and
    gradient norms to fp16 precision, no step skipped, and the weights move as fp32's do.  The loss
    scale starts at 2**8 (the config file may tune loss scaling): at the default 2**16 a tiny model
    overflows and skips its first steps."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip(f"DeepSpeed's {get_accelerator().device_name()} accelerator has no fp16 on this host")
    data, reference, ref_weights = ddp_reference
    (tmp_path / "ds.json").write_text(json.dumps({"fp16": {"initial_scale_power": 8}}))
    result = train_loop(to_dict(_cfg(tiny_qwen2, data, tmp_path / "out", max_steps=3, grad_accum_steps=2, fp16=True,
                                     engine={"name": "deepspeed", "zero_stage": 2,
                                             "config_file": str(tmp_path / "ds.json")})))
    losses = [m["loss"] for m in result["history"]]
    ref_losses = [m["loss"] for m in reference]
    assert losses != ref_losses  # half precision really ran
    np.testing.assert_allclose(losses, ref_losses, atol=2e-2, rtol=0)
    np.testing.assert_allclose([m["grad_norm"] for m in result["history"]], [m["grad_norm"] for m in reference],
                               rtol=5e-2)  # finite: no overflow, no skipped step
    base = {k: v for k, v in load_file(Path(tiny_qwen2) / "model.safetensors").items()}
    weights = _final_weights(tmp_path / "out")
    moved = ref = 0.0
    for name, value in ref_weights.items():
        if name in base and not torch.equal(value, base[name]):  # the LoRA-merged weights
            moved += float((weights[name].float() - value).norm() ** 2)
            ref += float((value - base[name]).norm() ** 2)
    assert ref > 0 and moved ** 0.5 < 0.1 * ref ** 0.5  # fp16's update is fp32's to within 10%
