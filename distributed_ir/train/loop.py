"""The per-worker training loop: setup -> loop -> report.

``train_loop(config: dict)`` runs inside each Ray Train worker (Ray has set up the process
group) and equally without Ray at world size 1, which is how unit tests and single-GPU checks
call it.  The config is a plain dict rebuilt into :class:`TrainConfig` here: no globals.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distributed_ir.config import TrainConfig, from_dict
from distributed_ir.data.records import read_records
from distributed_ir.losses import build_loss
from distributed_ir.models.embedder import Embedder
from distributed_ir.train import checkpoint as ckpt
from distributed_ir.train import faults
from distributed_ir.train.batching import TextBatch, epoch_batches, steps_per_epoch


class DualEncoder(nn.Module):
    """One module whose single forward encodes queries and documents.

    DDP must see exactly one forward per backward; wrapping both encodes in one module call
    keeps queries at their own (short) max length instead of padding them to document length.
    """

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, query: dict[str, torch.Tensor], document: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(**query), self.embedder(**document)


def _ray_context() -> Any | None:
    """Ray Train's context when running inside a Ray Train worker, else None."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        ctx.get_world_rank()
        return ctx
    except Exception:  # not inside a Ray Train worker
        return None


def _device(cfg: TrainConfig, in_ray: bool) -> torch.device:
    if in_ray:
        import ray.train.torch

        return ray.train.torch.get_device()
    if cfg.scaling.use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("scaling.use_gpu=true but no CUDA device is visible")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.optim.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def compute_loss(module: nn.Module, loss_fn: nn.Module, embedder: Embedder, batch: TextBatch,
                 device: torch.device, autocast: Any) -> torch.Tensor:
    """Tokenise one micro-batch, run the single forward and the loss."""
    query = {k: v.to(device) for k, v in embedder.tokenize(batch.queries, "query").items()}
    document = {k: v.to(device) for k, v in embedder.tokenize(batch.positives + batch.negatives, "document").items()}
    with autocast:
        q, d = module(query, document)
    b = len(batch.queries)
    if batch.labels is not None:
        return loss_fn(q, d, torch.tensor(batch.labels, device=device))
    return loss_fn(q, d[:b], d[b:] if batch.negatives else None)


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train an embedder on this worker's shard; returns the last metrics (rank 0 saves)."""
    cfg = from_dict(TrainConfig, config)
    ctx = _ray_context()
    in_ray = ctx is not None
    rank, world_size = (ctx.get_world_rank(), ctx.get_world_size()) if in_ray else (0, 1)
    threads = cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg, in_ray)

    # ---- setup: data, model (from a checkpoint when resuming), optimizer, schedule
    fmt, records = read_records(cfg.train_path)
    wants = {"cosent": ("scored",), "infonce": ("pair", "triplet"), "triplet": ("pair", "triplet")}[cfg.loss.name]
    if fmt not in wants:
        raise ValueError(f"{cfg.train_path}: loss {cfg.loss.name!r} needs {' or '.join(wants)} records, "
                         f"the file holds {fmt} records")
    resume_dir = _resume_dir(cfg, in_ray)
    model_cfg = replace(cfg.model, name_or_path=str(resume_dir / "model")) if resume_dir else cfg.model
    embedder = Embedder.from_config(model_cfg).to(device)
    embedder.train()
    # Distinct dropout per rank (DDP broadcasts rank 0's weights, so init is unaffected).
    torch.manual_seed(cfg.seed + rank)
    module: nn.Module = DualEncoder(embedder)
    if world_size > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    k = cfg.num_negatives if fmt == "triplet" else 0
    micro_per_epoch = steps_per_epoch(len(records), world_size, cfg.batch_size)
    opt_per_epoch = micro_per_epoch // cfg.grad_accum_steps
    if opt_per_epoch == 0:
        raise ValueError(
            f"{cfg.train_path}: {len(records)} records give no full optimizer step at "
            f"{world_size} workers x batch {cfg.batch_size} x accumulation {cfg.grad_accum_steps}"
        )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * opt_per_epoch
    scheduler = _scheduler(cfg, optimizer, total_steps)
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    if resume_dir:
        state = ckpt.load_training_state(resume_dir, optimizer, scheduler)
    loss_fn = build_loss(cfg.loss)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    if rank == 0:
        print(f"[train] {len(records)} {fmt} records, {world_size} worker(s) x batch {cfg.batch_size} "
              f"x accum {cfg.grad_accum_steps}, {total_steps} optimizer steps, device {device}, "
              f"threads {threads}, start step {state['step']}", flush=True)

    # ---- loop
    window = {"loss": 0.0, "micro": 0, "samples": 0, "t0": time.perf_counter(), "grad_norm": 0.0}
    last: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    step = state["step"]
    epoch = state["epoch"]
    while step < total_steps:
        micro_used = opt_per_epoch * cfg.grad_accum_steps
        batches = epoch_batches(records, epoch, rank, world_size, cfg.batch_size, k, cfg.seed,
                                start_step=state["micro_in_epoch"])
        micro = state["micro_in_epoch"]
        for batch in batches:
            if micro >= micro_used or step >= total_steps:
                break
            micro += 1
            faults.trace_batch(rank, epoch, micro, step + 1, batch.queries)  # opt-in (env), tests only
            sync = micro % cfg.grad_accum_steps == 0
            no_sync = module.no_sync() if (world_size > 1 and not sync) else nullcontext()
            with no_sync:
                loss = compute_loss(module, loss_fn, embedder, batch, device, autocast)
                (loss / cfg.grad_accum_steps).backward()
            window["loss"] += loss.item()
            window["micro"] += 1
            window["samples"] += len(batch.queries) * world_size
            if not sync:
                continue
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            window["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            faults.maybe_kill(rank, step)  # opt-in (env) fault injection, tests only
            done = step >= total_steps
            position = {"step": step, "epoch": epoch, "micro_in_epoch": micro}
            if micro >= micro_used:
                position = {"step": step, "epoch": epoch + 1, "micro_in_epoch": 0}
            save = done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if step % cfg.log_every == 0 or save:
                last = _metrics(window, step, total_steps, epoch, scheduler)
                history.append(last)
                if rank == 0:
                    print(_progress_line(last), flush=True)
            if save:
                _checkpoint(embedder, optimizer, scheduler, position, cfg, rank, in_ray, last, final=done)
            elif in_ray and step % cfg.log_every == 0:
                import ray.train

                ray.train.report(last)
        if step < total_steps:
            epoch += 1
            state["micro_in_epoch"] = 0
    if world_size > 1:
        dist.barrier()
    if resume_dir and in_ray:
        shutil.rmtree(resume_dir, ignore_errors=True)  # our local copy of Ray's checkpoint
    return {**last, "history": history}


def _resume_dir(cfg: TrainConfig, in_ray: bool) -> Path | None:
    if in_ray:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            # Copy out of Ray's storage so the model can be (re)loaded by path.
            local = Path(tempfile.mkdtemp(prefix="dir-resume-"))
            checkpoint.to_directory(str(local))
            return local
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not (path / ckpt.STATE_FILE).is_file():
            raise FileNotFoundError(f"resume_from={path}: not a distributed-ir training checkpoint")
        return path
    return None


def _metrics(window: dict[str, Any], step: int, total: int, epoch: int, scheduler: Any) -> dict[str, Any]:
    elapsed = time.perf_counter() - window["t0"]
    out = {
        "step": step,
        "total_steps": total,
        "epoch": epoch,
        "loss": window["loss"] / max(1, window["micro"]),
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": window["grad_norm"],
        "samples_per_s": window["samples"] / elapsed if elapsed > 0 else 0.0,
    }
    window.update(loss=0.0, micro=0, samples=0, t0=time.perf_counter())
    return out


def _progress_line(m: dict[str, Any]) -> str:
    width = 20
    filled = int(width * m["step"] / m["total_steps"])
    return (f"[train] [{'#' * filled}{'.' * (width - filled)}] step {m['step']}/{m['total_steps']} "
            f"epoch {m['epoch']} loss {m['loss']:.4f} lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} "
            f"samples/s {m['samples_per_s']:.1f}")


def _checkpoint(embedder: Embedder, optimizer: Any, scheduler: Any, position: dict[str, int], cfg: TrainConfig,
                rank: int, in_ray: bool, metrics: dict[str, Any], final: bool) -> None:
    """Rank 0 writes model + optimizer/scheduler/position; under Ray every rank reports."""
    if not in_ray:
        if rank == 0:
            name = "final" if final else f"step_{position['step']:07d}"
            ckpt.save_training_state(Path(cfg.output_dir) / "checkpoints" / name, embedder, optimizer, scheduler,
                                     position, metrics)
        return
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    tmp = Path(tempfile.mkdtemp(prefix="dir-ckpt-"))
    ckpt.save_training_state(tmp, embedder, optimizer, scheduler, position, metrics)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    shutil.rmtree(tmp, ignore_errors=True)
