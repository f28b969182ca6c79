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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distributed_ir import faults
from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
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


@dataclass
class _Worker:
    """This worker's place in the run: its config, rank, world size, device and torch threads."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    in_ray: bool
    threads: int


@dataclass
class _Plan:
    """What the records and the world size fix before the first step."""

    fmt: str
    records: list[Any]
    negatives: int  # hard negatives per query in a batch (triplet records only)
    batch_size: int  # this worker's micro-batch
    opt_per_epoch: int  # optimizer steps per epoch
    total_steps: int


@dataclass
class _Progress:
    """What the loop carries from step to step besides the position: the metrics window, rank 0's
    history, the last logged metrics, and whether this attempt took its just-in-time checkpoint."""

    history: list[dict[str, Any]]
    window: dict[str, Any] = field(default_factory=lambda: {"loss": 0.0, "micro": 0, "samples": 0,
                                                             "t0": time.perf_counter(), "grad_norm": 0.0})
    last: dict[str, Any] = field(default_factory=dict)
    jit_saved: bool = False  # one just-in-time checkpoint per attempt when a node is being preempted


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Train ``cfg.task`` on this worker's shard with ``cfg.engine``; returns the last metrics."""
    cfg = from_dict(TrainConfig, config)
    w = _setup_worker(cfg)
    task = get_task(cfg)

    # ---- setup: data, model, engine (optimizer + schedule), resume
    plan = _plan(cfg, task, w.world_size)
    engine = _build_engine(w, task, plan.total_steps)
    resume_dir = _resume_dir(cfg, w.in_ray)
    state, history = _restore(w, engine, resume_dir, plan.batch_size)
    if w.rank == 0:
        print(f"[train] task {task.name}, engine {engine.name}"
              f"{f' ZeRO-{cfg.engine.zero_stage}' if engine.name == 'deepspeed' else ''}, "
              f"{len(plan.records)} {plan.fmt} records, {w.world_size} worker(s) x batch {plan.batch_size} "
              f"x accum {cfg.grad_accum_steps}, {plan.total_steps} optimizer steps, device {w.device}, "
              f"threads {w.threads}, start step {state['step']}", flush=True)

    # ---- loop
    progress = _Progress(history)
    _train_epochs(w, task, engine, plan, state, progress)

    # ---- finish
    if w.world_size > 1:
        dist.barrier()
    if resume_dir and (w.in_ray or ckpt.is_uri(cfg.resume_from)) and resume_dir != Path(cfg.resume_from):
        shutil.rmtree(resume_dir, ignore_errors=True)  # our local copy of Ray's (or a URI's) checkpoint
    return {**progress.last, "history": progress.history}


def _setup_worker(cfg: TrainConfig) -> _Worker:
    """Rank and world size (Ray Train's, else 0 of 1), torch threads, the base seed, the device."""
    ctx = _ray_context()
    in_ray = ctx is not None
    rank, world_size = (ctx.get_world_rank(), ctx.get_world_size()) if in_ray else (0, 1)
    threads = cfg.scaling.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    return _Worker(cfg, rank, world_size, _device(cfg, in_ray), in_ray, threads)


def _plan(cfg: TrainConfig, task: Any, world_size: int) -> _Plan:
    """Read and check the records; size the micro-batch, the epoch and the run for this world size."""
    fmt, records = read_records(cfg.train_path)
    task.check_format(fmt, cfg.train_path)
    task.check_records(records, cfg.train_path)
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
    return _Plan(fmt, records, cfg.num_negatives if fmt == "triplet" else 0, batch_size, opt_per_epoch, total_steps)


def _build_engine(w: _Worker, task: Any, total_steps: int) -> DDPEngine | DeepSpeedEngine:
    """Build the task's module (partitioned from the start under ZeRO-3) and wrap it in the engine."""
    cfg = w.cfg
    ds_config = None
    if cfg.engine.name == "deepspeed":
        ds_config = deepspeed_config(cfg, w.world_size)
        init_deepspeed_distributed("nccl" if w.device.type == "cuda" else "gloo")
        init_ctx = DeepSpeedEngine.init_context(ds_config)
    else:
        init_ctx = DDPEngine.init_context()
    with init_ctx:
        module = task.build()
    module.train()
    # Distinct dropout per rank (DDP/DeepSpeed broadcast rank 0's weights, so init is unaffected).
    torch.manual_seed(cfg.seed + w.rank)
    return build_engine(cfg, module, task.param_groups(module), w.device, w.world_size, total_steps, ds_config)


def _restore(w: _Worker, engine: Any, resume_dir: Path | None,
             batch_size: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Load engine state, data position, this rank's RNG and the history from ``resume_dir``;
    without one, the start of the run."""
    if not resume_dir:
        return {"step": 0, "epoch": 0, "micro_in_epoch": 0}, []
    engine.load(resume_dir)
    state = ckpt.load_training_state(resume_dir)
    ckpt.load_rank_rng(resume_dir, w.rank)
    history = ckpt.load_history(resume_dir, state["step"])
    if w.rank == 0:
        print(_resume_line(state, w.world_size, batch_size), flush=True)
    return state, history


def _train_epochs(w: _Worker, task: Any, engine: Any, plan: _Plan, state: dict[str, int],
                  progress: _Progress) -> None:
    """From ``state``'s position to ``plan.total_steps``: micro-steps, optimizer steps at each
    accumulation boundary, then :func:`_after_step` (log, checkpoint or report)."""
    cfg = w.cfg
    attempt = faults.attempt_id(w.rank, w.world_size)  # opt-in (env), tests only
    micro_used = plan.opt_per_epoch * cfg.grad_accum_steps
    step, epoch, start = state["step"], state["epoch"], state["micro_in_epoch"]
    while step < plan.total_steps:
        batches = epoch_batches(plan.records, epoch, w.rank, w.world_size, plan.batch_size, plan.negatives, cfg.seed,
                                start_step=start)
        micro = start
        for batch in batches:
            if micro >= micro_used or step >= plan.total_steps:
                break
            micro += 1
            faults.trace_batch(w.rank, epoch, micro, step + 1, batch.queries, attempt, w.world_size)  # opt-in (env)
            boundary = micro % cfg.grad_accum_steps == 0
            inputs = _to_device(task.inputs(engine.inner, batch), w.device)
            loss, grad_norm = engine.train_step(inputs, boundary)
            progress.window["loss"] += loss
            progress.window["micro"] += 1
            progress.window["samples"] += len(batch.queries) * w.world_size
            if not boundary:
                continue
            progress.window["grad_norm"] = grad_norm
            step += 1
            faults.maybe_kill(w.rank, step)  # opt-in (env) fault injection, tests only
            position = {"step": step, "epoch": epoch, "micro_in_epoch": micro, "world_size": w.world_size}
            if micro >= micro_used:  # the epoch's last step: resume at the next epoch's start
                position.update(epoch=epoch + 1, micro_in_epoch=0)
            _after_step(w, task, engine, plan, progress, epoch, position)
            faults.maybe_hold(w.rank, step)  # opt-in (env): a drill parks every rank here
        if step < plan.total_steps:
            epoch += 1
            start = 0


def _after_step(w: _Worker, task: Any, engine: Any, plan: _Plan, progress: _Progress, epoch: int,
                position: dict[str, int]) -> None:
    """After optimizer step ``position["step"]``: log every ``log_every`` steps; checkpoint every
    ``checkpoint_every`` steps, at the last step, or at once on a preemption notice; else report
    the logged metrics to Ray Train."""
    cfg, step = w.cfg, position["step"]
    done = step >= plan.total_steps
    save = done or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
    if w.in_ray and not save and not progress.jit_saved and step % cfg.log_every == 0:
        save = progress.jit_saved = _preemption_notice(w.rank, step)
    if step % cfg.log_every == 0 or save:
        progress.last = _metrics(progress.window, step, plan.total_steps, epoch, engine, w.device) | {
            "world_size": w.world_size, "worker_batch_size": plan.batch_size}
        progress.history.append(progress.last)
        if w.rank == 0:
            print(_progress_line(progress.last), flush=True)
    if save:
        _checkpoint(task, engine, position, w, progress.last, progress.history, final=done)
    elif w.in_ray and step % cfg.log_every == 0:
        import ray.train

        ray.train.report(progress.last)


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


def _checkpoint(task: Any, engine: Any, position: dict[str, int], w: _Worker, metrics: dict[str, Any],
                history: list[dict[str, Any]], final: bool) -> None:
    """Every rank writes its engine state; rank 0 adds the exported model and the data position.

    Without Ray the directory is ``output_dir/checkpoints/<step>``; under Ray each rank writes a
    local directory and reports it (Ray merges the ranks' files into one checkpoint).
    """
    rank, in_ray = w.rank, w.in_ray
    full = engine.full_state_dict(rank)  # collective under ZeRO-3: every rank enters
    if in_ray:
        path = Path(tempfile.mkdtemp(prefix="dir-ckpt-"))
    else:
        name = "final" if final else f"step_{position['step']:07d}"
        path = Path(w.cfg.output_dir) / "checkpoints" / name
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
