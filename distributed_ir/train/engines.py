"""Training engines: how one micro-step's gradients become an optimizer step across workers.

``DDPEngine``: torch DDP (every worker holds the full model and optimizer), torch AdamW,
autocast for bf16, GradScaler for fp16, DDP ``no_sync`` during accumulation.
``DeepSpeedEngine``: the DeepSpeed engine with ZeRO stage 0-3 and optional CPU offload; batch
sizes, accumulation, clipping, bf16/fp16 and the optimizer are written into DeepSpeed's own
config, so DeepSpeed does the accumulation, scaling and clipping.  Under Ray Train the process
group already exists (gloo on CPU, nccl on GPU) and DeepSpeed adopts it.

Both expose the same small API to the loop: ``train_step``, ``lr``, ``save``/``load`` of the
engine state (optimizer, scheduler, and for DeepSpeed the partitioned model), ``full_state_dict``
(gathered on rank 0) and ``memory`` (bytes of parameters, gradients, master copy and optimizer
moments held by this worker).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import ConfigError, deep_merge
from distributed_ir.train.grad_cache import cached_forward_backward

ENGINE_STATE_FILE = "engine_state.pt"


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(cfg.optim.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


def _tensor_bytes(tensors: Any, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def memory_breakdown(params: list[torch.Tensor], grads: list[torch.Tensor], master: list[torch.Tensor],
                     optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this worker holds: module ``params``, ``grads``, the optimizer's own fp32 ``master``
    copy (DeepSpeed's partitions; none for DDP, whose optimizer steps the module's parameters) and
    AdamW ``moments``.  Tensors are counted once (by storage address)."""
    seen: set[int] = set()
    out = {"params": _tensor_bytes(params, seen), "grads": _tensor_bytes(grads, seen),
           "master": _tensor_bytes(master, seen)}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    out["master"] += _tensor_bytes(opt_params, seen)
    out["grads"] += _tensor_bytes([p.grad for p in opt_params if p.grad is not None], seen)
    states = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    out["moments"] = _tensor_bytes(states, seen)
    return out


class DDPEngine:
    name = "ddp"

    def __init__(self, cfg: TrainConfig, module: nn.Module, param_groups: list[dict[str, Any]], device: torch.device,
                 world_size: int, total_steps: int):
        self.cfg = cfg
        self.inner = module.to(device)
        self.device = device
        self.world_size = world_size
        self.module: nn.Module = module
        if world_size > 1:
            self.module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        self.params = [p for g in param_groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(param_groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.scheduler = build_scheduler(cfg, self.optimizer, total_steps)
        dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
        self._autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if cfg.fp16 else None

    @staticmethod
    def init_context() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward_backward(self, inputs: dict[str, Any], boundary: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch (gradients all-reduced once, at a ``boundary``);
        with ``grad_cache_chunk`` the cached-gradient passes of :mod:`~distributed_ir.train.grad_cache`."""
        def backward(loss: torch.Tensor) -> None:
            scaled = loss / self.cfg.grad_accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()

        def sync(last: bool = True) -> contextlib.AbstractContextManager:
            # DDP reduces in the backward of a forward run outside no_sync(): the last one of a boundary
            return self.module.no_sync() if (self.world_size > 1 and not (boundary and last)) \
                else contextlib.nullcontext()

        if self.cfg.grad_cache_chunk:
            return cached_forward_backward(self.module, self.inner.loss_from_embeddings, inputs,
                                           self.cfg.grad_cache_chunk, backward, sync, self._autocast)
        with sync():
            with self._autocast():
                loss = self.module(**inputs)
            backward(loss)
        return loss.detach()

    def train_step(self, inputs: dict[str, Any], boundary: bool) -> tuple[float, float | None]:
        """Forward + backward of one micro-batch; at an accumulation boundary also step."""
        loss = self.forward_backward(inputs, boundary)
        if not boundary:
            return loss.item(), None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), norm

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, path: Path, rank: int) -> None:
        """Rank 0 writes optimizer/scheduler state and the trainable weights (LoRA needs them to resume)."""
        if rank != 0:
            return
        from safetensors.torch import save_file

        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, path / ENGINE_STATE_FILE)
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.inner.named_parameters() if p.requires_grad}
        save_file(trainable, str(path / "trainable.safetensors"))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        trainable = load_file(str(path / "trainable.safetensors"))
        missing = [n for n, p in self.inner.named_parameters() if p.requires_grad and n not in trainable]
        if missing:
            raise RuntimeError(f"{path}: checkpoint lacks trainable weights {missing[:5]} (was it made with "
                               "another task/LoRA setting?)")
        with torch.no_grad():
            for n, p in self.inner.named_parameters():
                if n in trainable:
                    p.copy_(trainable[n].to(p.device))
        state = torch.load(path / ENGINE_STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        if rank != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.inner.state_dict().items()}

    def memory(self) -> dict[str, int]:
        params = list(self.inner.parameters())
        return memory_breakdown(params, [p.grad for p in params if p.grad is not None], [], self.optimizer)


# DeepSpeed settings the loop derives from the train config and relies on, with the setting that owns
# each: the data sharding, accumulation boundary and step count assume the batch sizes; the export,
# memory report and DDP equivalence assume the precision; the loop's param groups and schedule are
# the optimizer's (DeepSpeed would silently ignore a file's scheduler beside the loop's);
# ZeRO-3's partitioned build and gathered export follow engine.zero_stage.
LOOP_OWNED = {
    "train_batch_size": "batch_size x grad_accum_steps x workers",
    "train_micro_batch_size_per_gpu": "batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "elasticity": "batch_size / grad_accum_steps / scaling.num_workers",
    "bf16.enabled": "bf16", "bfloat16": "bf16", "fp16.enabled": "fp16", "amp": "bf16 / fp16",
    "torch_autocast": "bf16 / fp16",
    "gradient_clipping": "optim.max_grad_norm",
    "optimizer": "optim.lr / optim.weight_decay / engine.torch_adam",
    "scheduler": "optim.scheduler / optim.warmup_ratio",
    "zero_optimization.stage": "engine.zero_stage",
}


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON config from ours; ``engine.config_file`` is merged over it.

    The file may tune anything else (bucket sizes, overlap, offload details, fp16 loss scaling,
    logging), but it may not set a key of :data:`LOOP_OWNED` (batch sizes, accumulation,
    elasticity, whether bf16/fp16/amp/autocast is on, gradient clipping, optimizer, scheduler, ZeRO
    stage): the loop relies on those matching the train config, so a file that sets one is
    refused (ConfigError naming the keys and the file).
    """
    e = cfg.engine
    zero: dict[str, Any] = {"stage": e.zero_stage}
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if e.zero_stage == 3:
        # Export gathers parameters itself; the 16-bit consolidation would only cost memory.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.worker_batch_size(world_size),
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.worker_batch_size(world_size) * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay,
                                                  "torch_adam": e.torch_adam}},
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "fp16": {"enabled": cfg.fp16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if e.offload_optimizer and e.torch_adam:
        ds["zero_force_ds_cpu_optimizer"] = False
    if e.config_file:
        extra = json.loads(Path(e.config_file).read_text())
        if not isinstance(extra, dict):
            raise ConfigError(f"{e.config_file}: expected a JSON object", key="engine.config_file")
        # "a.b" is set by {"a": {"b": ...}}, and replaced by a non-object "a"
        nested = {f"{k}.{sub}" for k, v in extra.items() if isinstance(v, dict) for sub in v}
        clash = sorted(k for k in LOOP_OWNED if k in extra or k in nested
                       or ("." in k and not isinstance(extra.get(k.split(".")[0], {}), dict)))
        if clash:
            raise ConfigError(f"{e.config_file}: sets {', '.join(clash)}; the training loop owns these: set "
                              f"{'; '.join(LOOP_OWNED[k] for k in clash)} in the train config instead",
                              key="engine.config_file")
        ds = deep_merge(ds, extra)
    return ds


def init_deepspeed_distributed(backend: str) -> None:
    """Adopt Ray Train's process group; alone (world size 1, no Ray) start a one-process group."""
    import deepspeed

    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg: TrainConfig, module: nn.Module, param_groups: list[dict[str, Any]], device: torch.device,
                 world_size: int, total_steps: int, ds_config: dict[str, Any]):
        import deepspeed

        self.cfg = cfg
        self.zero_stage = cfg.engine.zero_stage
        if self.zero_stage < 3:
            module = module.to(device)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module,
            model_parameters=param_groups,
            config=ds_config,
            lr_scheduler=lambda opt: build_scheduler(cfg, opt, total_steps),
        )
        self.inner = self.engine.module
        # Without ZeRO and mixed precision DeepSpeed clips the plain optimizer's gradients but
        # records no norm (get_global_grad_norm() is None): the loop measures it itself.
        self._measure_norm = self.zero_stage == 0 and not (cfg.bf16 or cfg.fp16)

    @staticmethod
    def init_context(ds_config: dict[str, Any]) -> contextlib.AbstractContextManager:
        """ZeRO-3: build the model partitioned (from_pretrained under zero.Init), never whole per worker."""
        if ds_config["zero_optimization"]["stage"] != 3:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def ctx():
            from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

            keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
            try:
                yield keep
            finally:
                unset_hf_deepspeed_config()

        return ctx()

    def forward_backward(self, inputs: dict[str, Any], boundary: bool) -> torch.Tensor:
        """Forward + ``engine.backward`` of one micro-batch; DeepSpeed reduces at the ``boundary``
        (ZeRO-2/3 also reduce-scatter every backward).  With ``grad_cache_chunk``: one forward +
        ``engine.backward`` per chunk, the boundary flag set only for the last chunk."""
        if self.cfg.grad_cache_chunk:
            def chunk_context(last: bool) -> contextlib.AbstractContextManager:
                self.engine.set_gradient_accumulation_boundary(boundary and last)
                return contextlib.nullcontext()

            # engine.backward divides each chunk's surrogate by gradient_accumulation_steps, as the loss below
            return cached_forward_backward(self.engine, self.inner.loss_from_embeddings, inputs,
                                           self.cfg.grad_cache_chunk, self.engine.backward, chunk_context)
        self.engine.set_gradient_accumulation_boundary(boundary)
        loss = self.engine(**inputs)
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        return loss.detach()

    def train_step(self, inputs: dict[str, Any], boundary: bool) -> tuple[float, float | None]:
        loss = self.forward_backward(inputs, boundary)
        measured = None
        if boundary and self._measure_norm:  # the all-reduced gradients, before clipping and the step
            measured = torch.nn.utils.get_total_norm([p.grad for p in self.inner.parameters() if p.grad is not None])
        self.engine.step()  # a real optimizer step only at the boundary
        if not boundary:
            return loss.item(), None
        norm = measured if measured is not None else self.engine.get_global_grad_norm()
        return loss.item(), float(norm) if norm is not None else 0.0

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, path: Path, rank: int) -> None:
        """Every rank writes its partition (model, optimizer, scheduler) under ``path/deepspeed``."""
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False)

    def load(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{path / 'deepspeed'}: no DeepSpeed checkpoint with tag 'state'")

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """Every ``state_dict()`` key with its whole tensor, on rank 0 (None elsewhere).

        Under ZeRO-3 every rank joins one gather per parameter.  A key is matched to its parameter
        by identity (``state_dict(keep_vars=True)``), so an alias such as a tied ``lm_head.weight``,
        which ``named_parameters()`` skips, gets the gathered tensor of the parameter it aliases.
        """
        if self.zero_stage != 3:
            return {k: v.detach().cpu() for k, v in self.inner.state_dict().items()} if rank == 0 else None
        import deepspeed

        entries = self.inner.state_dict(keep_vars=True)  # persistent entries only (not e.g. rotary inv_freq)
        keys_of: dict[int, list[str]] = {}
        for key, value in entries.items():
            keys_of.setdefault(id(value), []).append(key)
        out: dict[str, torch.Tensor] = {}
        for param in self.inner.parameters():  # each parameter once, in the same order on every rank
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    whole = param.detach().cpu().clone()
                    out.update((key, whole) for key in keys_of.get(id(param), []))
        if rank != 0:
            return None
        for key, value in entries.items():  # buffers (and any other persistent entry)
            if key not in out:
                out[key] = value.detach().cpu().clone()
        return {key: out[key] for key in entries}

    def memory(self) -> dict[str, int]:
        params = list(self.inner.parameters())
        local = [getattr(p, "ds_tensor", p) for p in params]  # ZeRO-3: this rank's partition
        opt = self.optimizer
        grads = [p.grad for p in params if p.grad is not None]
        master: list[torch.Tensor] = []
        for attr, into in (("single_partition_of_fp32_groups", master), ("fp32_partitioned_groups_flat", master),
                           ("averaged_gradients", grads)):
            groups = getattr(opt, attr, None)
            if isinstance(groups, dict):
                groups = [t for v in groups.values() for t in (v if isinstance(v, list) else [v])]
            into.extend(t for t in groups or [] if isinstance(t, torch.Tensor))
        return memory_breakdown(local, grads, master, getattr(opt, "optimizer", opt))


def build_engine(cfg: TrainConfig, module: nn.Module, param_groups: list[dict[str, Any]], device: torch.device,
                 world_size: int, total_steps: int, ds_config: dict[str, Any] | None = None):
    if cfg.engine.name == "deepspeed":
        assert ds_config is not None
        return DeepSpeedEngine(cfg, module, param_groups, device, world_size, total_steps, ds_config)
    return DDPEngine(cfg, module, param_groups, device, world_size, total_steps)
