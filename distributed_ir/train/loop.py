"""The per-worker training loop: setup -> loop -> report.

``train_loop(config: dict)`` runs inside each Ray Train worker (Ray has set up the process
group) and equally without Ray at world size 1, which is how unit tests and single-GPU checks
call it.  The config is a plain dict rebuilt into :class:`TrainConfig` here: no globals.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distributed_ir import faults
from distributed_ir.config import TrainConfig, from_dict
from distributed_ir.data.records import read_records
from distributed_ir.train import checkpoint as ckpt
from distributed_ir.train.batching import epoch_batches, steps_per_epoch
from distributed_ir.train.engines import (
    DDPEngine,
    DeepSpeedEngine,
    build_engine,
    deepspeed_config,
    init_deepspeed_distributed,
)
from distributed_ir.train.tasks import get_task


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


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg.task`` on this worker's shard with ``cfg.engine``; returns the last metrics."""
    cfg = from_dict(TrainConfig, config)
    ctx = _ray_context()
    in_ray = ctx is not None
    rank, world_size = (ctx.get_world_rank(), ctx.get_world_size()) if in_ray else (0, 1)
    threads = cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    device = _device(cfg, in_ray)
    task = get_task(cfg)

    # ---- setup: data, model, engine (optimizer + schedule), resume
    fmt, records = read_records(cfg.train_path)
    task.check_format(fmt, cfg.train_path)
    task.check_records(records, cfg.train_path)
    k = cfg.num_negatives if fmt == "triplet" else 0
    # Elastic runs: each worker's share of the global micro-batch follows the world size, so the
    # global batch, data order, step count (and so the LR schedule) and negatives do not.
    batch_size = cfg.worker_batch_size(world_size)
    micro_per_epoch = steps_per_epoch(len(records), world_size, batch_size)
    opt_per_epoch = micro_per_epoch // cfg.grad_accum_steps
    if opt_per_epoch == 0:
        raise ValueError(
            f"{cfg.train_path}: {len(records)} records give no full optimizer step at "
            f"{world_size} workers x batch {batch_size} x accumulation {cfg.grad_accum_steps}"
        )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * opt_per_epoch
    ds_config = None
    if cfg.engine.name == "deepspeed":
        ds_config = deepspeed_config(cfg, world_size)
        init_deepspeed_distributed("nccl" if device.type == "cuda" else "gloo")
        init_ctx = DeepSpeedEngine.init_context(ds_config)
    else:
        init_ctx = DDPEngine.init_context()
    with init_ctx:
        module = task.build()
    module.train()
    # Distinct dropout per rank (DDP/DeepSpeed broadcast rank 0's weights, so init is unaffected).
    torch.manual_seed(cfg.seed + rank)
    engine = build_engine(cfg, module, task.param_groups(module), device, world_size, total_steps, ds_config)
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    history: list[dict[str, Any]] = []
    resume_dir = _resume_dir(cfg, in_ray)
    if resume_dir:
        engine.load(resume_dir)
        state = ckpt.load_training_state(resume_dir)
        ckpt.load_rank_rng(resume_dir, rank)
        history = ckpt.load_history(resume_dir, state["step"])
        if rank == 0:
            print(_resume_line(state, world_size, batch_size), flush=True)
    if rank == 0:
        print(f"[train] task {task.name}, engine {engine.name}"
              f"{f' ZeRO-{cfg.engine.zero_stage}' if engine.name == 'deepspeed' else ''}, "
              f"{len(records)} {fmt} records, {world_size} worker(s) x batch {batch_size} "
              f"x accum {cfg.grad_accum_steps}, {total_steps} optimizer steps, device {device}, "
              f"threads {threads}, start step {state['step']}", flush=True)

    # ---- loop
    window = {"loss": 0.0, "micro": 0, "samples": 0, "t0": time.perf_counter(), "grad_norm": 0.0}
    last: dict[str, Any] = {}
    attempt = faults.attempt_id(rank, world_size)  # opt-in (env), tests only
    jit_saved = False  # one just-in-time checkpoint per attempt when a node is being preempted
    step = state["step"]
    epoch = state["epoch"]
    while step < total_steps:
        micro_used = opt_per_epoch * cfg.grad_accum_steps
        batches = epoch_batches(records, epoch, rank, world_size, batch_size, k, cfg.seed,
                                start_step=state["micro_in_epoch"])
        micro = state["micro_in_epoch"]
        for batch in batches:
            if micro >= micro_used or step >= total_steps:
                break
            micro += 1
            faults.trace_batch(rank, epoch, micro, step + 1, batch.queries, attempt, world_size)  # opt-in (env)
            boundary = micro % cfg.grad_accum_steps == 0
            inputs = _to_device(task.inputs(engine.inner, batch), device)
            loss, grad_norm = engine.train_step(inputs, boundary)
            window["loss"] += loss
            window["micro"] += 1
            window["samples"] += len(batch.queries) * world_size
            if not boundary:
                continue
            window["grad_norm"] = grad_norm
            step += 1
            faults.maybe_kill(rank, step)  # opt-in (env) fault injection, tests only
            done = step >= total_steps
            position = {"step": step, "epoch": epoch, "micro_in_epoch": micro, "world_size": world_size}
            if micro >= micro_used:  # the epoch's last step: resume at the next epoch's start
                position.update(epoch=epoch + 1, micro_in_epoch=0)
            save = done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if in_ray and not save and not jit_saved and step % cfg.log_every == 0:
                save = jit_saved = _preemption_notice(rank, step)
            if step % cfg.log_every == 0 or save:
                last = _metrics(window, step, total_steps, epoch, engine, device) | {"world_size": world_size,
                                                                             "worker_batch_size": batch_size}
                history.append(last)
                if rank == 0:
                    print(_progress_line(last), flush=True)
            if save:
                _checkpoint(task, engine, position, cfg, rank, in_ray, last, history, final=done)
            elif in_ray and step % cfg.log_every == 0:
                import ray.train

                ray.train.report(last)
            faults.maybe_hold(rank, step)  # opt-in (env): a drill parks every rank here
        if step < total_steps:
            epoch += 1
            state["micro_in_epoch"] = 0
    if world_size > 1:
        dist.barrier()
    if resume_dir and (in_ray or ckpt.is_uri(cfg.resume_from)) and resume_dir != Path(cfg.resume_from):
        shutil.rmtree(resume_dir, ignore_errors=True)  # our local copy of Ray's (or a URI's) checkpoint
    return {**last, "history": history}


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in inputs.items()}


def _resume_dir(cfg: TrainConfig, in_ray: bool) -> Path | None:
    if in_ray:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            # Copy out of Ray's storage so the model can be (re)loaded by path.
            local = Path(tempfile.mkdtemp(prefix="dir-resume-"))
            checkpoint.to_directory(str(local))
            return local
    if cfg.resume_from and ckpt.is_uri(cfg.resume_from):
        # every worker fetches its own copy: a multi-node run has no common local disk
        local = ckpt.download(cfg.resume_from, Path(tempfile.mkdtemp(prefix="dir-resume-")))
        if not (local / ckpt.TRAINING_STATE_FILE).is_file():
            raise FileNotFoundError(f"resume_from={cfg.resume_from}: not a distributed-ir training checkpoint")
        return local
    if cfg.resume_from:
        path = Path(cfg.resume_from)
        if not (path / ckpt.TRAINING_STATE_FILE).is_file():
            raise FileNotFoundError(f"resume_from={path}: not a distributed-ir training checkpoint")
        return path
    return None


def _preemption_notice(rank: int, step: int) -> bool:
    """True when Ray Train reports that a node of this run is being preempted (a drain with a
    deadline, e.g. a spot reclaim): the caller then checkpoints at once, so the restart loses
    nothing.  A collective: every rank calls it at the same steps and gets the same answer."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return False
    if rank == 0:
        print(f"[train] preemption notice for node(s) {sorted(info.preempted_node_to_ranks)}: "
              f"just-in-time checkpoint at step {step}", flush=True)
    return True


def _resume_line(state: dict[str, int], world_size: int, batch_size: int) -> str:
    """Say where a resumed run continues, and when the world size changed since the checkpoint."""
    before = state.get("world_size")
    line = (f"[train] resumed at step {state['step']} (epoch {state['epoch']}, micro-step {state['micro_in_epoch']}) "
            f"with {world_size} worker(s)")
    if before and before != world_size:
        why = ("a worker or its node was lost: continuing with the workers that fit" if world_size < before
               else "room for more workers appeared: the elastic group grew")
        line += (f"; world size changed {before} -> {world_size} ({why}); each worker now takes {batch_size} "
                 "records per micro-step, the global batch is unchanged")
    return line


def _metrics(window: dict[str, Any], step: int, total: int, epoch: int, engine: Any,
             device: torch.device) -> dict[str, Any]:
    elapsed = time.perf_counter() - window["t0"]
    memory = engine.memory()
    loss = window["loss"] / max(1, window["micro"])
    if dist.is_initialized() and dist.get_world_size() > 1:
        # the global batch's loss (every rank logs at the same steps): each rank's loss is the mean
        # over its equal share of queries, so the mean of the ranks' is the same at any world size
        summed = torch.tensor([loss], dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(summed)
        loss = float(summed[0]) / dist.get_world_size()
    out = {
        "step": step,
        "total_steps": total,
        "epoch": epoch,
        "loss": loss,
        "lr": engine.lr(),
        "grad_norm": window["grad_norm"],
        "samples_per_s": window["samples"] / elapsed if elapsed > 0 else 0.0,
        # what this worker holds for training: parameters, gradients, fp32 master copy, AdamW moments
        **{f"{k}_mb": v / 2**20 for k, v in memory.items()},
        "state_mb": sum(memory.values()) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    window.update(loss=0.0, micro=0, samples=0, t0=time.perf_counter())
    return out


def _progress_line(m: dict[str, Any]) -> str:
    width = 20
    filled = int(width * m["step"] / m["total_steps"])
    return (f"[train] [{'#' * filled}{'.' * (width - filled)}] step {m['step']}/{m['total_steps']} "
            f"epoch {m['epoch']} loss {m['loss']:.4f} lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} "
            f"samples/s {m['samples_per_s']:.1f}")


def _checkpoint(task: Any, engine: Any, position: dict[str, int], cfg: TrainConfig, rank: int, in_ray: bool,
                metrics: dict[str, Any], history: list[dict[str, Any]], final: bool) -> None:
    """Every rank writes its engine state; rank 0 adds the exported model and the data position.

    Without Ray the directory is ``output_dir/checkpoints/<step>``; under Ray each rank writes a
    local directory and reports it (Ray merges the ranks' files into one checkpoint).
    """
    full = engine.full_state_dict(rank)  # collective under ZeRO-3: every rank enters
    if in_ray:
        path = Path(tempfile.mkdtemp(prefix="dir-ckpt-"))
    else:
        name = "final" if final else f"step_{position['step']:07d}"
        path = Path(cfg.output_dir) / "checkpoints" / name
        if rank == 0 and path.exists():
            shutil.rmtree(path)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        path.mkdir(parents=True, exist_ok=True)
    engine.save(path, rank)
    ckpt.save_rank_rng(path, rank)
    if rank == 0:
        # A fresh CPU model of the same shape takes the gathered weights.  Building it may draw
        # random numbers (LoRA init): fork the RNG so training's stream is the same with or
        # without checkpoints.
        with torch.random.fork_rng(devices=[]):
            export = task.build()
        export.load_state_dict(full)
        task.export(export, path / "model")
        ckpt.save_training_state(path, position, metrics, history)
    if in_ray:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        shutil.rmtree(path, ignore_errors=True)
    elif dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
