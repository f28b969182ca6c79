"""The per-worker loop without Ray (world size 1): formats, schedule, checkpoints, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.data.records import ScoredRecord, write_records
from distributed_ir.train.batching import epoch_batches
from distributed_ir.train.loop import train_loop
from tests.conftest import TRAIN_TOPICS, build_tiny_model, loop_config, triplets


def test_batches_do_not_depend_on_world_size():
    """Global step s of 1 worker x 8 == rank 0's 4 + rank 1's 4 at step s of 2 workers."""
    recs = triplets(16)
    one = [b.queries for b in epoch_batches(recs, 0, 0, 1, 8, 1, seed=1)]
    left = [b.queries for b in epoch_batches(recs, 0, 0, 2, 4, 1, seed=1)]
    right = [b.queries for b in epoch_batches(recs, 0, 1, 2, 4, 1, seed=1)]
    assert len(one) == 2 and one == [a + b for a, b in zip(left, right)]
    assert one != [b.queries for b in epoch_batches(recs, 1, 0, 1, 8, 1, seed=1)]  # reshuffled per epoch
    # resume: starting at step 1 yields exactly the tail
    assert [b.queries for b in epoch_batches(recs, 0, 0, 1, 8, 1, seed=1, start_step=1)] == one[1:]


def test_trains_and_loss_falls(tiny_bert, tmp_path):
    write_records(tmp_path / "train.jsonl", triplets(24))
    result = train_loop(loop_config(tiny_bert, tmp_path, epochs=6, num_negatives=1))
    losses = [m["loss"] for m in result["history"]]
    assert len(losses) == 6 * (24 // 4)
    assert sum(losses[-6:]) < sum(losses[:6])
    assert all(m["samples_per_s"] > 0 for m in result["history"])  # grad norms: tests/test_pinned_losses.py
    final = tmp_path / "out" / "checkpoints" / "final"
    assert (final / "model" / "modules.json").is_file()
    assert json.loads((final / "metrics.json").read_text())["step"] == 36


def test_schedule_warmup_and_linear_decay(tiny_bert, tmp_path):
    write_records(tmp_path / "train.jsonl", triplets(16))
    result = train_loop(loop_config(tiny_bert, tmp_path, max_steps=8, optim={"lr": 1e-3, "warmup_ratio": 0.25}))
    lrs = [m["lr"] for m in result["history"]]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)  # 2 warmup steps
    assert lrs[-1] == pytest.approx(0.0) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_grad_accumulation_counts_optimizer_steps(tiny_bert, tmp_path):
    write_records(tmp_path / "train.jsonl", triplets(24))
    result = train_loop(loop_config(tiny_bert, tmp_path, epochs=2, grad_accum_steps=3, log_every=1))
    assert [m["step"] for m in result["history"]] == [1, 2, 3, 4]  # 6 micro-batches / 3 per step x 2 epochs


def _scored(n=24):
    """Query i with an on-topic document (label 1.0), a half-related one (0.5) and an off-topic one (0.0)."""
    out = []
    for i in range(n):
        q = f"what about {TRAIN_TOPICS[i % 8].split()[0]} {i}"
        out += [ScoredRecord(q, f"{TRAIN_TOPICS[i % 8]} fact {i}", 1.0),
                ScoredRecord(q, f"{TRAIN_TOPICS[i % 8].split()[0]} and {TRAIN_TOPICS[(i + 3) % 8]} {i}", 0.5),
                ScoredRecord(q, f"{TRAIN_TOPICS[(i + 5) % 8]} other {i}", 0.0)]
    return out


def _pair_order_accuracy(model_dir, records) -> float:
    """Fraction of (query, higher label, lower label) pairs the model orders right by cosine."""
    from distributed_ir.models.embedder import Embedder

    emb = Embedder.load(model_dir)
    q = emb.encode([r.query for r in records], "query")
    d = emb.encode([r.document for r in records], "document")
    s = (q * d).sum(-1)
    by_query: dict[str, list[tuple[float, float]]] = {}
    for r, score in zip(records, s):
        by_query.setdefault(r.query, []).append((r.label, float(score)))
    pairs = [(a[1] > b[1]) for g in by_query.values() for a in g for b in g if a[0] > b[0]]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("loss", ["triplet", "cosent"])
def test_other_losses_train_a_better_ranker(tiny_bert, tmp_path, loss):
    """Triplet (triplet records) and CoSENT (scored records) over 8 epochs: the trained model orders
    the training documents by relevance better than the untrained one does."""
    write_records(tmp_path / "train.jsonl", triplets(24) if loss == "triplet" else _scored(8))
    result = train_loop(loop_config(tiny_bert, tmp_path, epochs=8, loss={"name": loss},
                                    optim={"lr": 2e-3, "warmup_ratio": 0.0}))
    assert result["step"] == 8 * 6
    check = _scored(8)
    before = _pair_order_accuracy(tiny_bert, check)
    after = _pair_order_accuracy(tmp_path / "out" / "checkpoints" / "final" / "model", check)
    assert after >= 0.9 and after > before + 0.1, (before, after)


def test_resume_from_checkpoint_is_exact(tiny_bert, tmp_path):
    """Stop after 3 of 6 steps, resume: same weights as the uninterrupted run."""
    write_records(tmp_path / "train.jsonl", triplets(16))
    straight = train_loop(loop_config(tiny_bert, tmp_path, max_steps=6, checkpoint_every=3, num_negatives=1))
    ckpts = tmp_path / "out" / "checkpoints"
    w_straight = load_file(ckpts / "final" / "model" / "model.safetensors")
    resumed_out = tmp_path / "resumed"
    resumed = train_loop(loop_config(tiny_bert, tmp_path, max_steps=6, checkpoint_every=3, num_negatives=1,
                                     output_dir=str(resumed_out), resume_from=str(ckpts / "step_0000003")))
    # the history continues the checkpoint's (steps 1-3 read back from it), then steps 4-6 trained again
    assert [m["step"] for m in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["history"][:3] == json.loads((ckpts / "step_0000003" / "history.json").read_text())
    assert [m["loss"] for m in resumed["history"]] == pytest.approx([m["loss"] for m in straight["history"]],
                                                                    abs=1e-6)
    w_resumed = load_file(resumed_out / "checkpoints" / "final" / "model" / "model.safetensors")
    for name, value in w_straight.items():
        torch.testing.assert_close(w_resumed[name], value, atol=1e-6, rtol=0)


def test_bad_resume_path(tiny_bert, tmp_path):
    write_records(tmp_path / "train.jsonl", triplets(8))
    with pytest.raises(FileNotFoundError, match="not a distributed-ir training checkpoint"):
        train_loop(loop_config(tiny_bert, tmp_path, resume_from=str(tmp_path)))


def test_too_few_records_for_one_step(tiny_bert, tmp_path):
    write_records(tmp_path / "train.jsonl", triplets(3))
    with pytest.raises(ValueError, match="give no full optimizer step"):
        train_loop(loop_config(tiny_bert, tmp_path))


def test_each_rank_resumes_its_own_rng_stream(tmp_path):
    """Rank 1's dropout stream is not rank 0's: its RNG is saved and restored separately."""
    from distributed_ir.train import checkpoint as ckpt

    torch.manual_seed(0)
    ckpt.save_training_state(tmp_path, {"step": 1, "epoch": 0, "micro_in_epoch": 1}, {"step": 1})
    rank0_next = torch.rand(3)
    torch.manual_seed(1)
    ckpt.save_rank_rng(tmp_path, 1)
    rank1_next = torch.rand(3)
    assert not (tmp_path / "rng_rank0.pt").exists()
    for rank, expected in ((0, rank0_next), (1, rank1_next)):
        torch.manual_seed(99)
        ckpt.load_training_state(tmp_path)
        ckpt.load_rank_rng(tmp_path, rank)
        torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)


def test_checkpoints_do_not_change_the_dropout_stream(tiny_bert, tmp_path):
    """Rank 0 builds an export model at every checkpoint (LoRA init draws random numbers): the
    training RNG must not see it, so checkpointing every step gives the losses of a run without."""
    write_records(tmp_path / "train.jsonl", triplets(16))
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.3}
    runs = [train_loop(loop_config(tiny_bert, tmp_path, max_steps=3, checkpoint_every=every, num_negatives=1,
                                   lora=lora, output_dir=str(tmp_path / f"every{every}")))
            for every in (0, 1)]
    losses = [[m["loss"] for m in r["history"]] for r in runs]
    assert len(losses[0]) == 3 and len(set(losses[0])) == 3
    assert losses[1] == losses[0]


def test_rng_files_hold_every_device_stream(tmp_path):
    """training_state.pt and rng_rank<R>.pt hold the CPU stream and one CUDA stream per visible
    device (none on a CPU-only host), and loading restores them."""
    from distributed_ir.train import checkpoint as ckpt

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    ckpt.save_training_state(tmp_path, {"step": 1, "epoch": 0, "micro_in_epoch": 1}, {"step": 1})
    ckpt.save_rank_rng(tmp_path, 1)
    expected = (torch.rand(3), torch.rand(3, device="cuda") if cuda else None)
    for name in (ckpt.TRAINING_STATE_FILE, "rng_rank1.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert len(saved["cuda_rng"]) == torch.cuda.device_count()
    for rank in (0, 1):
        torch.manual_seed(99)
        ckpt.load_training_state(tmp_path)
        ckpt.load_rank_rng(tmp_path, rank)
        torch.testing.assert_close(torch.rand(3), expected[0], atol=0, rtol=0)
        if cuda:
            torch.testing.assert_close(torch.rand(3, device="cuda"), expected[1], atol=0, rtol=0)


@pytest.mark.parametrize("task", ["embedder", "llm_reranker"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_bert, tmp_path, task):
    """One forward/backward with and without activation checkpointing: same loss and gradients
    (LoRA dropout on: the recomputation replays the same mask), and the layers really recompute."""
    from distributed_ir.train.tasks import get_task

    write_records(tmp_path / "train.jsonl", triplets(8))
    if task == "embedder":  # full fine-tune of a BERT encoder
        kw = {"num_negatives": 1}
        model = tiny_bert
    else:  # LoRA on a causal LM, through the reranker task
        model = build_tiny_model(tmp_path / "lm", "qwen2_lm")
        kw = {"task": task, "num_negatives": 1, "loss": {"name": "listwise"}, "reranker": {"max_length": 320},
              "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.2}}
    batch = next(iter(epoch_batches(triplets(8), 0, 0, 1, 4, 1, seed=1)))
    runs = []
    for checkpointing in (False, True):
        cfg = from_dict(TrainConfig, loop_config(model, tmp_path, gradient_checkpointing=checkpointing, **kw))
        t = get_task(cfg)
        torch.manual_seed(0)  # the same LoRA init in both builds
        module = t.build()
        module.train()
        layer = next(m for n, m in module.named_modules() if n.endswith(("layers.0", "layer.0")))
        calls = []  # transformers checkpoints the layer's forward: a submodule inside it runs again in backward
        next(layer.children()).register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(1)  # the same dropout masks
        loss = module(**t.inputs(module, batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        runs.append((loss.detach(), grads, len(calls)))
    (loss, grads, calls), (ck_loss, ck_grads, ck_calls) = runs
    forwards = 1 if task == "llm_reranker" else 2  # the embedder encodes queries and documents apart
    assert (calls, ck_calls) == (forwards, 2 * forwards)
    torch.testing.assert_close(ck_loss, loss, atol=1e-6, rtol=0)
    assert grads.keys() == ck_grads.keys() and len(grads) > 4
    assert sum(float(g.abs().sum()) > 0 for g in grads.values()) > 4  # (LoRA A gets none while B is 0)
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
