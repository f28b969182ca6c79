"""GradCache (cached in-batch negatives): the chunked step's gradients equal the whole batch's.

The batch is conftest's ``shared_positive_batch`` (as in test_distributed_equivalence): 8 queries,
2 hard negatives each, query 5 sharing query 1's positive (the false-negative mask), teacher scores
(a distillation term beside InfoNCE).
Chunks of 3 rows split queries 3+3+2 and documents 3x7+3, so no chunk lines up with a query's
candidates.

- 1 worker, DDP engine, dropout off: cached == uncached (loss and gradients, 1e-5); the cache is
  used: every forward with a graph holds at most 3 rows, the whole batch is encoded without one;
  triplet, distillation alone and plain InfoNCE cache alike; the loop reproduces the pinned run.
- dropout on: cached == the same chunks encoded with one graph (part 3 replays part 1's dropout
  masks); with the RNG replay disabled the gradients differ; the training RNG stream is unmoved.
- DeepSpeed ZeRO-1/2/3 (world size 1, gradient accumulation 2): cached == uncached.
- 2 Ray Train workers with cross-worker negatives: DDP and DeepSpeed ZeRO-2 cached gradients ==
  1 worker's uncached gradients on the union batch, and DDP all-reduces once per step.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict, to_dict
from distributed_ir.train import grad_cache
from distributed_ir.train.engines import DDPEngine
from distributed_ir.train.grad_cache import split_features
from distributed_ir.train.tasks import get_task
from tests.conftest import PINNED, loop_config, shared_positive_batch, triplets

CHUNK = 3


def _cfg(model, chunk: int = 0, **kw) -> TrainConfig:
    base = {"model": {"name_or_path": str(model)}, "num_negatives": 2, "batch_size": 8, "grad_cache_chunk": chunk,
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
            "loss": {"temperature": 0.05, "mask_shared_positives": True, "distill_weight": 0.5}}
    base.update(kw)
    return from_dict(TrainConfig, base)


def _grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _to(inputs: dict, device: str) -> dict:
    return {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else
                v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _ddp_step(cfg: TrainConfig, batch, world: int = 1, seed: int = 7, device: str = "cpu"):
    """Loss and gradients (on the CPU) of one boundary micro-step on the DDP engine."""
    task = get_task(cfg)
    module = task.build()
    module.train()
    engine = DDPEngine(cfg, module, task.param_groups(module), torch.device(device), world, 10)
    torch.manual_seed(seed)
    loss = engine.forward_backward(_to(task.inputs(module, batch), device), boundary=True)
    return float(loss), _grads(module).cpu(), engine


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(scope="module")
def dropout_bert(tiny_bert, tmp_path_factory):
    """tiny_bert with dropout 0.1 on hidden states and attention probabilities."""
    path = tmp_path_factory.mktemp("dropout_bert") / "model"
    shutil.copytree(tiny_bert, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _count_forwards(module: torch.nn.Module) -> list[tuple[bool, int]]:
    """(grad enabled, rows) of every embedder forward from now on."""
    calls: list[tuple[bool, int]] = []
    module.embedder.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append((torch.is_grad_enabled(), kwargs["input_ids"].shape[0])),
        with_kwargs=True)
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_cached_equals_uncached_on_one_worker(tiny_bert, device):
    loss, grads, _ = _ddp_step(_cfg(tiny_bert), shared_positive_batch(), device=device)
    assert grads.abs().max() > 1e-3  # not trivially zero
    cfg = _cfg(tiny_bert, CHUNK)
    task = get_task(cfg)
    module = task.build()
    calls = _count_forwards(module)
    engine = DDPEngine(cfg, module, task.param_groups(module), torch.device(device), 1, 10)
    cached = float(engine.forward_backward(_to(task.inputs(module, shared_positive_batch()), device), boundary=True))
    assert abs(cached - loss) < 1e-5
    torch.testing.assert_close(_grads(module).cpu(), grads, atol=1e-5, rtol=1e-5)
    # the cache is used: 8 queries + 24 documents in chunks of 3 = 3 + 8 chunks, each encoded once
    # without a graph, then once with one; no forward with a graph sees more than a chunk
    chunks = [3, 3, 2] + [3] * 8
    assert calls == [(False, n) for n in chunks] + [(True, n) for n in chunks]
    # one chunk as large as the batch is the plain step
    _, single, _ = _ddp_step(_cfg(tiny_bert, 64), shared_positive_batch(), device=device)
    torch.testing.assert_close(single, grads, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", [{"name": "triplet"}, {"name": "distill"},
                                  {"gather_across_workers": False, "mask_shared_positives": False}],
                         ids=["triplet", "distill", "plain_infonce"])
def test_other_losses_cache_alike(tiny_bert, loss):
    """Any loss of the embeddings caches: triplet margin, distillation alone, plain InfoNCE."""
    loss = {"temperature": 0.05, **loss}
    ref_loss, ref, _ = _ddp_step(_cfg(tiny_bert, loss=loss), shared_positive_batch())
    cached_loss, cached, _ = _ddp_step(_cfg(tiny_bert, CHUNK, loss=loss), shared_positive_batch())
    assert ref.abs().max() > 1e-4 and abs(cached_loss - ref_loss) < 1e-5
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-5)


def test_training_loop_reproduces_the_pinned_trajectory(tiny_bert, tmp_path):
    """``grad_cache_chunk`` through the config and the loop: the pinned first losses and gradient
    norms of the uncached embedder (batch 4 in chunks of 3: queries 3+1, documents 3+3+2)."""
    from distributed_ir.data.records import write_records
    from distributed_ir.train.loop import train_loop

    write_records(tmp_path / "train.jsonl", triplets(16))
    result = train_loop(loop_config(tiny_bert, tmp_path, max_steps=3, num_negatives=1, grad_cache_chunk=CHUNK))
    got = {k: [m[k] for m in result["history"]] for k in ("loss", "grad_norm")}
    assert got["loss"] == pytest.approx(PINNED["embedder"]["loss"], abs=1e-4)
    assert got["grad_norm"] == pytest.approx(PINNED["embedder"]["grad_norm"], rel=1e-4)


def test_config_refuses_what_it_cannot_cache(tiny_bert):
    from distributed_ir.config_loader import ConfigError

    with pytest.raises(ConfigError, match="grad_cache_chunk must be >= 0") as e:
        _cfg(tiny_bert, -1)
    assert e.value.key == "grad_cache_chunk"
    with pytest.raises(ConfigError, match="task=cross_encoder") as e:
        from_dict(TrainConfig, {"task": "cross_encoder", "grad_cache_chunk": 4})
    assert e.value.key == "grad_cache_chunk"


def _rng_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def _chunked_reference(cfg: TrainConfig, batch, seed: int, device: str):
    """The same chunks encoded in the same order with one graph, one backward (dropout on)."""
    task = get_task(cfg)
    module = task.build().to(device)
    module.train()
    inputs = _to(task.inputs(module, batch), device)
    torch.manual_seed(seed)
    q = torch.cat([module(encode=c) for c in split_features(inputs.pop("query"), CHUNK)])
    d = torch.cat([module(encode=c) for c in split_features(inputs.pop("document"), CHUNK)])
    loss = module.loss_from_embeddings(q, d, **inputs)
    loss.backward()
    return float(loss.detach()), _grads(module).cpu(), _rng_state(device)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_masks_are_replayed(dropout_bert, monkeypatch, device):
    """On a GPU the dropout masks come from the device's generator: its state is replayed too."""
    cfg = _cfg(dropout_bert, CHUNK)
    ref_loss, ref_grads, ref_rng = _chunked_reference(cfg, shared_positive_batch(), 7, device)
    loss, grads, _ = _ddp_step(cfg, shared_positive_batch(), seed=7, device=device)
    assert abs(loss - ref_loss) < 1e-5
    torch.testing.assert_close(grads, ref_grads, atol=1e-5, rtol=1e-5)
    # the replay is forked: training's RNG stream moves as if each chunk had been encoded once
    assert torch.equal(_rng_state(device), ref_rng)
    # dropout is really on: another seed gives other gradients ...
    _, other, _ = _ddp_step(cfg, shared_positive_batch(), seed=8, device=device)
    assert (other - ref_grads).abs().max() > 1e-4
    # ... and re-encoding without the saved RNG state (fresh masks) gives wrong ones
    monkeypatch.setattr(grad_cache.RandContext, "__enter__", lambda self: None)
    monkeypatch.setattr(grad_cache.RandContext, "__exit__", lambda self, *exc: None)
    _, unreplayed, _ = _ddp_step(cfg, shared_positive_batch(), seed=7, device=device)
    assert (unreplayed - ref_grads).abs().max() > 1e-4


def _deepspeed_grads(cfg: TrainConfig, batches: list) -> tuple[list[float], torch.Tensor]:
    """Losses of ``batches`` as one accumulated step on the DeepSpeed engine, and the reduced
    full gradients before the optimizer step (``safe_get_full_grad`` reads ZeRO-1/2 partitions)."""
    from deepspeed.utils import safe_get_full_grad

    from distributed_ir.train.engines import DeepSpeedEngine, deepspeed_config, init_deepspeed_distributed

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    ds = deepspeed_config(cfg, world)
    init_deepspeed_distributed("gloo")
    task = get_task(cfg)
    module = task.build()
    module.train()
    engine = DeepSpeedEngine(cfg, module, task.param_groups(module), torch.device("cpu"), world, 10, ds)
    losses = [float(engine.forward_backward(task.inputs(module, b), boundary=i == len(batches) - 1))
              for i, b in enumerate(batches)]
    grads = torch.cat([safe_get_full_grad(p).flatten() for p in engine.inner.parameters() if p.requires_grad])
    return losses, grads


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cached_equals_uncached_on_deepspeed_with_accumulation(tiny_bert, stage):
    """Two micro-batches of 4 queries, accumulated: every chunk's ``engine.backward`` but the
    last micro-batch's last one is off the accumulation boundary (ZeRO-1 reduces there; ZeRO-2/3
    reduce-scatter every backward; ZeRO-3 also gathers parameters for every chunk's forward)."""
    batches = [shared_positive_batch(0, 2), shared_positive_batch(1, 2)]
    engine = {"name": "deepspeed", "zero_stage": stage}
    ref_losses, ref = _deepspeed_grads(_cfg(tiny_bert, batch_size=4, grad_accum_steps=2, engine=engine), batches)
    losses, grads = _deepspeed_grads(_cfg(tiny_bert, CHUNK, batch_size=4, grad_accum_steps=2, engine=engine), batches)
    assert ref.abs().max() > 1e-3
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) < 1e-5
    torch.testing.assert_close(grads, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 2 Ray Train workers

def _ray_worker(config: dict) -> None:
    """Per worker: DDP uncached, DDP cached (counting all-reduced buckets) and DeepSpeed ZeRO-2
    cached gradients of this rank's half batch; rank 0 saves them."""
    import ray.train
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    batch = shared_positive_batch(rank, world)
    out: dict = {}
    for name, chunk in (("ddp", 0), ("ddp_cached", CHUNK)):
        cfg = from_dict(TrainConfig, {**config["cfg"], "grad_cache_chunk": chunk})
        task = get_task(cfg)
        module = task.build()
        engine = DDPEngine(cfg, module, task.param_groups(module), torch.device("cpu"), world, 10)
        buckets: list[int] = []

        def count(state, bucket, buckets=buckets):
            buckets.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        engine.module.register_comm_hook(None, count)
        out[name] = {"loss": float(engine.forward_backward(task.inputs(module, batch), boundary=True)),
                     "grads": _grads(module), "buckets": buckets}
    cfg = from_dict(TrainConfig, {**config["cfg"], "grad_cache_chunk": CHUNK,
                                  "engine": {"name": "deepspeed", "zero_stage": 2}})
    losses, grads = _deepspeed_grads(cfg, [batch])
    out["zero2_cached"] = {"loss": losses[0], "grads": grads}
    if rank == 0:
        torch.save(out, config["out"])


@pytest.mark.slow
@pytest.mark.ray
def test_cached_equals_uncached_on_two_ray_workers(tiny_bert, tmp_path, ray_cluster):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ref_loss, ref, _ = _ddp_step(_cfg(tiny_bert), shared_positive_batch())
    cfg = to_dict(_cfg(tiny_bert, batch_size=4))
    out = tmp_path / "rank0.pt"
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"cfg": cfg, "out": str(out)}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="grad-cache", storage_path=str(tmp_path / "ray")))
    result = trainer.fit()
    assert result.error is None
    res = torch.load(out, weights_only=True)
    for name in ("ddp", "ddp_cached", "zero2_cached"):
        # rank 0's loss is the mean over its 4 queries (against all 8 gathered documents)
        assert abs(res[name]["loss"] - res["ddp"]["loss"]) < 1e-5, name
        torch.testing.assert_close(res[name]["grads"], ref, atol=1e-5, rtol=1e-5, msg=name)
    assert abs(res["ddp"]["loss"] - ref_loss) > 1e-4  # a half batch's loss, not the union's
    # gradients are all-reduced once per step: the cached step reduces each bucket once, as the plain one
    assert res["ddp_cached"]["buckets"] == res["ddp"]["buckets"] and len(res["ddp"]["buckets"]) >= 1
