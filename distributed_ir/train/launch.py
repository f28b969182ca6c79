"""Launch the per-worker loop on Ray Train (``TorchTrainer``) and collect the final model."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_ir import faults
from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import to_dict
from distributed_ir.data.records import read_records, write_records
from distributed_ir.train import checkpoint as ckpt
from distributed_ir.train.engines import deepspeed_config
from distributed_ir.train.loop import train_loop
from distributed_ir.train.tasks import get_task


@dataclass
class TrainResult:
    model_path: Path
    metrics: dict[str, Any]
    checkpoint_path: str
    seconds: float
    input: dict[str, Any] = field(default_factory=dict)  # accepted/rejected training records
    # rank 0's logged steps ({"step", "loss", "lr", "world_size", ...}), from train_loop's return value
    history: list[dict[str, Any]] = field(default_factory=list)
    # storage_path a URI (s3://, gs://): where the exported model and history.json were uploaded
    model_uri: str = ""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join ``address`` (or $RAY_ADDRESS), else start a local cluster (dashboard on 127.0.0.1).

    A local cluster keeps Ray's token authentication on (``RAY_AUTH_MODE=token`` unless the user
    chose otherwise): anyone who can reach an unauthenticated Ray port can run code on it. Ray
    2.60 rewrites a 127.0.0.1 node address to the machine's reachable IP, so the token, not the
    bind address, is what guards the GCS and raylet ports.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # Ray 2.60 turns token auth on for a new local cluster unless RAY_AUTH_MODE says otherwise
    # (it sets RAY_AUTH_MODE=token itself and refreshes its cached config: setting the variable
    # here, after `import ray`, would leave that cache stale and the GCS handshake would fail).
    mode = os.environ.get("RAY_AUTH_MODE", "token").lower()
    if mode != "token":
        print(f"[ray] warning: RAY_AUTH_MODE={mode}: the local Ray cluster accepts unauthenticated "
              "requests on 127.0.0.1", flush=True)
    # The dashboard serves the State API that Ray Train's placement-group cleaner polls.
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
    token = Path.home() / ".ray" / "auth_token"
    if mode == "token" and token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)  # Ray writes it 0644; the token is a password


def run_training(cfg: TrainConfig, records: tuple[str, list] | None = None) -> TrainResult:
    """Fine-tune on ``cfg.scaling.num_workers`` Ray Train workers; copy the model to output_dir/model.

    ``records``: ``(format, records)`` the caller built itself and wrote to ``cfg.train_path`` (the
    pipeline's mined or qrels records): handed on as they are, not read back and validated again.

    ``num_workers: [min, max]`` runs elastic (Ray Train V2): the run starts with as many workers as
    fit (at least min), and every resize (a lost node, or room for more) restarts the workers from
    the latest checkpoint; each worker's micro-batch follows the world size
    (:meth:`TrainConfig.worker_batch_size`) so the result does not depend on it.
    """
    # Ray Train's controller/worker metrics callbacks take CPU that a small node's training step
    # needs; Ray reads this switch from the driver's environment when the trainer is built.
    os.environ["RAY_TRAIN_METRICS_ENABLED"] = "1" if cfg.ray_train_metrics else "0"
    init_ray()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.storage_path or str(out / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    # A reused RunConfig name with the same storage silently resumes the old run: unique names.
    name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    train_path, input_summary = _checked_records(cfg, out, records)
    trainer = _trainer(cfg, _loop_config(cfg, out, train_path), name, storage)
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    model = _export_final(result.checkpoint, out)
    returned = result.return_value if isinstance(result.return_value, dict) else {}
    history = list(returned.get("history", []))
    model_uri = ""
    if ckpt.is_uri(storage):
        # the run's folder on shared storage gets the exported model and the whole history beside
        # Ray's checkpoints: nothing of the result lives only on this (driver) machine
        model_uri = ckpt.upload(model, ckpt.join_uri(storage, name, "model"))
        ckpt.write_file(ckpt.join_uri(storage, name, "history.json"), json.dumps(history, indent=1).encode())
        print(f"[train] model and history uploaded to {ckpt.join_uri(storage, name)}", flush=True)
    return TrainResult(model_path=model, metrics=dict(result.metrics or {}), checkpoint_path=result.checkpoint.path,
                       seconds=seconds, input=input_summary, history=history, model_uri=model_uri)


def _checked_records(cfg: TrainConfig, out: Path, records: tuple[str, list] | None) -> tuple[Path, dict[str, Any]]:
    """Validate the records once, here: bad input fails before any worker starts (a clean
    FILE:LINE: field error), and with on_error=skip the workers read only accepted records
    (``out/train_records.accepted.jsonl``).  Returns the file the workers read and the counts."""
    if records is None:
        check = cfg.input.check(out)
        fmt, rows = read_records(cfg.train_path, check=check)
        print(check.summary_line(), flush=True)
        input_summary = check.summary()
    else:
        fmt, rows = records
        input_summary = {"input": len(rows), "accepted": len(rows), "rejected": 0, "handed_on": True}
    task = get_task(cfg)  # format and loss needs (e.g. distillation's teacher scores): refused before workers start
    task.check_format(fmt, cfg.train_path)
    task.check_records(rows, cfg.train_path)
    if input_summary["rejected"]:
        return write_records(out / "train_records.accepted.jsonl", rows), input_summary
    return Path(cfg.train_path), input_summary


def _loop_config(cfg: TrainConfig, out: Path, train_path: Path) -> dict[str, Any]:
    """``train_loop``'s config: ``cfg`` with absolute paths only (Ray Train workers run in their
    own working directory); a resume URI or DeepSpeed file that cannot work fails here."""
    loop_config = to_dict(cfg)
    loop_config["train_path"] = str(train_path.resolve())
    loop_config["output_dir"] = str(out)
    if cfg.resume_from and ckpt.is_uri(cfg.resume_from):
        ckpt.require_checkpoint(cfg.resume_from)  # every worker downloads it; fail here if it is not one
    elif cfg.resume_from:
        loop_config["resume_from"] = str(Path(cfg.resume_from).resolve())
    if cfg.model.name_or_path != "default" and Path(cfg.model.name_or_path).exists():
        loop_config["model"]["name_or_path"] = str(Path(cfg.model.name_or_path).resolve())
    if cfg.engine.name == "deepspeed" and cfg.engine.config_file:
        loop_config["engine"]["config_file"] = str(Path(cfg.engine.config_file).resolve())
        deepspeed_config(cfg, cfg.scaling.max_workers)  # a file that clashes with the loop fails here, not in workers
    return loop_config


def _trainer(cfg: TrainConfig, loop_config: dict[str, Any], name: str, storage: str):
    """The ``TorchTrainer`` running :func:`train_loop` on the configured (possibly elastic) workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from distributed_ir.train.resize_log import WorldSizeLog

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.ray_num_workers(),  # (min, max): Ray Train V2's elastic policy
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[WorldSizeLog()],  # logs when and why the world size changed
            # Worker processes do not inherit the driver's environment: forward the opt-in
            # fault-injection/trace switches (empty unless a test or drill sets them).
            worker_runtime_env={"env_vars": faults.forwarded_env(faults.TRAIN_WORKER)},
        ),
    )


def _export_final(checkpoint: Any, out: Path) -> Path:
    """Copy the last checkpoint to ``out/final_checkpoint`` and its exported model to ``out/model``."""
    final = out / "final_checkpoint"
    if final.exists():
        shutil.rmtree(final)
    checkpoint.to_directory(str(final))
    model = out / "model"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(final / "model", model)
    return model
