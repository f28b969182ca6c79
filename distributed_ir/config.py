"""The application's configs: nested dataclasses (training, encoding, evaluation, the pipeline).

Every field carries help text in its metadata; ``__post_init__`` validates values so a bad
config fails before any worker starts.  Loading from YAML with dotted ``a.b=c`` overrides, and the
errors that name the key path and ``FILE:LINE``, live in :mod:`distributed_ir.config_loader`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from distributed_ir.config_loader import ConfigError, check_choice, config_field, from_dict
from distributed_ir.data.beir import name_problem
from distributed_ir.models.settings import LoraSettings, ModelSettings, RerankerSettings


@dataclass
class ModelConfig(ModelSettings):
    """The ``model:`` section: the models' own :class:`~distributed_ir.models.settings.ModelSettings`
    (which backbone and how it embeds), its ``ValueError`` reported as a config error."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(str(e), key=getattr(e, "key", None)) from None


# The one defaults rule for ``loss`` (train embedder, train reranker and the pipeline alike): by
# task, (name, temperature) when the config leaves them out.  Bounded scores (cosine, ColBERT's
# MaxSim / |q| in [-1, 1]) need a low temperature; cross-encoder and LLM logits have a free scale.
LOSS_DEFAULTS: dict[str, tuple[str, float]] = {
    "embedder": ("infonce", 0.05), "colbert": ("listwise", 0.05),
    "cross_encoder": ("listwise", 1.0), "llm_reranker": ("listwise", 1.0),
}
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "embedder": ("infonce", "triplet", "cosent", "distill"), "colbert": ("listwise",),  # ColBERT: in-batch lists
    "cross_encoder": ("listwise", "bce"), "llm_reranker": ("listwise", "bce"),
}


@dataclass
class LossConfig:
    name: str | None = config_field("infonce | triplet | cosent | distill (embedders); listwise | bce (rerankers); null = "
                             "the task's default (embedder infonce, rerankers listwise)", default=None)
    temperature: float | None = config_field(
        "softmax temperature for infonce / listwise, cosent scale = 1/temperature; null = the task's default "
        "(0.05 embedder and colbert, 1.0 cross_encoder and llm_reranker)", default=None)
    margin: float = config_field("margin for the triplet loss", default=0.2)
    gather_across_workers: bool = config_field("cross-worker negatives (all-gather with gradient)", default=True)
    distill_weight: float = config_field(
        "infonce + distill_weight x KL(teacher || student) over each query's candidates (records with `scores`); "
        "0 = off; loss.name=distill trains on the KL term alone", default=0.0)
    teacher_temperature: float = config_field("temperature of the teacher's scores in the distillation softmax "
                                       "(the student's is loss.temperature)", default=1.0)
    mask_shared_positives: bool = config_field(
        "infonce / ColBERT in-batch: a batch document that is also a positive of the row's query is not a "
        "negative for it (masked)", default=True)

    def __post_init__(self) -> None:
        if self.name is not None:
            check_choice("loss.name", self.name, ("infonce", "triplet", "cosent", "distill", "listwise", "bce"))
        if self.distill_weight < 0 or self.teacher_temperature <= 0:
            raise ConfigError("loss.distill_weight must be >= 0 and loss.teacher_temperature > 0",
                              key="loss.distill_weight")
        if self.distill_weight and self.name not in (None, "infonce"):
            raise ConfigError(f"loss.distill_weight is added to infonce, not to {self.name!r} (loss.name=distill "
                              "trains on distillation alone)", key="loss.distill_weight")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0", key="loss.temperature")


@dataclass
class OptimConfig:
    lr: float = config_field("peak learning rate (AdamW)", default=5e-5)
    weight_decay: float = config_field("AdamW weight decay", default=0.01)
    scheduler: str = config_field("linear | cosine | constant (all after warmup)", default="linear")
    warmup_ratio: float = config_field("fraction of optimizer steps spent warming up", default=0.1)
    max_grad_norm: float = config_field("clip gradients to this norm; 0 disables", default=1.0)

    def __post_init__(self) -> None:
        check_choice("optim.scheduler", self.scheduler, ("linear", "cosine", "constant"))
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("optim.warmup_ratio must be in [0, 1)")


@dataclass
class WorkerScaling:
    num_workers: int | list[int] = config_field(
        "Ray Train workers: N (fixed), or [min, max] (elastic: starts with as many as fit, at least min; grows "
        "towards max when nodes arrive and shrinks when one is lost, each time resuming from the latest "
        "checkpoint; the global batch stays batch_size x max)", default=1)
    use_gpu: bool = config_field("one GPU per worker", default=False)
    cpus_per_worker: float = config_field("CPUs reserved per worker", default=1.0)
    torch_threads: int = config_field("torch intra-op threads per worker; 0 = cpus_per_worker", default=0)
    resize_interval_s: float = config_field(
        "elastic: seconds between checks, while training, for room for more workers (Ray Train's "
        "elastic_resize_monitor_interval_s); a grow restarts the workers from the latest checkpoint", default=60.0)

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, list):
            bounds = self.num_workers
            if len(bounds) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in bounds):
                raise ConfigError(f"scaling.num_workers={bounds!r}: expected an int or [min, max] (two ints)",
                                  key="scaling.num_workers")
            if not 1 <= bounds[0] <= bounds[1]:
                raise ConfigError(f"scaling.num_workers={bounds!r}: need 1 <= min <= max", key="scaling.num_workers")
            if bounds[0] == bounds[1]:
                self.num_workers = bounds[0]  # [n, n] is the fixed run
        elif self.num_workers < 1:
            raise ConfigError("scaling.num_workers must be >= 1", key="scaling.num_workers")
        if self.cpus_per_worker <= 0 or self.torch_threads < 0:
            raise ConfigError("scaling.cpus_per_worker must be > 0 and torch_threads >= 0")
        if self.resize_interval_s < 0:
            raise ConfigError("scaling.resize_interval_s must be >= 0", key="scaling.resize_interval_s")

    @property
    def elastic(self) -> bool:
        """True for ``num_workers: [min, max]`` with min < max."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    def ray_num_workers(self) -> int | tuple[int, int]:
        """What Ray Train's ``ScalingConfig(num_workers=...)`` takes: an int, or (min, max) when elastic."""
        return (self.min_workers, self.max_workers) if self.elastic else self.max_workers


@dataclass
class EngineConfig:
    """How gradients, optimizer state and parameters are spread over workers.

    ``ddp``: every worker holds the whole model and optimizer (torch DDP).  ``deepspeed``: the
    DeepSpeed engine with ZeRO ``zero_stage`` 0-3 (1 shards optimizer state, 2 also gradients,
    3 also parameters), optionally offloading optimizer state / parameters to CPU memory.
    Batch size, accumulation, clipping and bf16/fp16 are mapped onto DeepSpeed's own settings.
    """

    name: str = config_field("ddp | deepspeed", default="ddp")
    zero_stage: int = config_field("DeepSpeed ZeRO stage 0-3", default=2)
    offload_optimizer: bool = config_field("keep optimizer state in CPU memory (ZeRO-Offload)", default=False)
    offload_params: bool = config_field("keep parameters in CPU memory (ZeRO-3 only)", default=False)
    torch_adam: bool = config_field(
        "use torch's AdamW inside DeepSpeed (no JIT op build); false = DeepSpeed's fused/CPU Adam", default=True
    )
    config_file: str = config_field("extra DeepSpeed JSON merged over the generated config ('' = none); it may not set "
                             "what the loop owns (batch sizes, accumulation, precision, clipping, optimizer, "
                             "scheduler, ZeRO stage)", default="")

    def __post_init__(self) -> None:
        check_choice("engine.name", self.name, ("ddp", "deepspeed"))
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError("engine.zero_stage must be 0, 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("engine.offload_params needs engine.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("engine.offload_optimizer needs engine.zero_stage >= 1")


@dataclass
class InputConfig:
    """What to do with bad input rows (see :mod:`distributed_ir.data.intake`)."""

    on_error: str = config_field("raise: stop at the first bad row (FILE:LINE: field); skip: write it to the "
                          "rejects file and go on", default="raise")
    rejects_path: str = config_field("rejects JSONL ('' = <output dir>/rejects.jsonl)", default="")
    max_text_bytes: int = config_field("longest accepted text field in UTF-8 bytes (default 1 MiB)", default=1 << 20)

    def __post_init__(self) -> None:
        check_choice("input.on_error", self.on_error, ("raise", "skip"))
        if self.max_text_bytes < 1:
            raise ConfigError("input.max_text_bytes must be >= 1", key="input.max_text_bytes")

    def check(self, output_dir: str | Path):
        """An :class:`~distributed_ir.data.intake.InputCheck` for one run writing to ``output_dir``."""
        from distributed_ir.data.intake import InputCheck

        return InputCheck(self.on_error, self.rejects_path or Path(output_dir) / "rejects.jsonl", self.max_text_bytes)


@dataclass
class RerankerConfig(RerankerSettings):
    """The ``reranker:`` section (tasks cross_encoder | colbert | llm_reranker): the model's own
    :class:`~distributed_ir.models.settings.RerankerSettings` (saved with it) plus how its head trains."""

    head_lr: float = config_field("learning rate of the new head (ColBERT linear; cross-encoder classifier + pooler); "
                           "0 = optim.lr (task llm_reranker: must stay 0, its LM head is not new)", default=0.0)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.head_lr < 0:
            raise ConfigError("reranker.head_lr must be >= 0", key="head_lr")


@dataclass
class TrainConfig:
    """Everything one embedder fine-tune needs; passed to every worker as a plain dict."""

    train_path: str = config_field("training records (JSONL or Parquet): pair, triplet or scored; in a pipeline, set = use "
                            "these prepared records instead of qrels pairs or mining", default="")
    output_dir: str = config_field("where checkpoints and the final model go", default="outputs/train")
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: WorkerScaling = field(default_factory=WorkerScaling)
    task: str = config_field("what is trained: embedder | cross_encoder | colbert | llm_reranker", default="embedder")
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = config_field("recompute activations in backward (less memory, ~30% slower)", default=False)
    train_document_max_length: int = config_field(
        "task embedder / colbert: cut documents to this many tokens while training only (0 = the model's own "
        "document max length); the saved model keeps model.document_max_length (embedder) or "
        "reranker.document_max_length (ColBERT) for encoding and scoring. Shorter training documents train faster "
        "(SciFact MiniLM, BENCHMARKS.md: 192 instead of 256 trained 1.8x faster and, encoded at 256, lost nothing)", default=0)
    grad_cache_chunk: int = config_field(
        "GradCache (cached in-batch negatives, task embedder): 0 = off; N = encode each worker's batch in chunks of "
        "N texts and back-propagate through cached embedding gradients, so batch_size can exceed what fits in "
        "activation memory (equal gradients, ~1 extra forward)", default=0)
    input: InputConfig = field(default_factory=InputConfig)
    epochs: int = config_field("passes over the training records", default=1)
    max_steps: int = config_field("stop after this many optimizer steps; -1 = epochs decide", default=-1)
    batch_size: int = config_field("records per worker per micro-step; elastic scaling.num_workers [min, max]: at max "
                            "workers (with w workers each takes batch_size x max / w, so the global batch, data "
                            "order and in-batch negatives stay the max-size run's)", default=32)
    grad_accum_steps: int = config_field("micro-steps per optimizer step", default=1)
    num_negatives: int = config_field("hard negatives per query taken from triplet records", default=1)
    bf16: bool = config_field("bf16 autocast (CPU with AMX/avx512_bf16, or GPU)", default=False)
    fp16: bool = config_field("fp16 mixed precision (GPU; deepspeed uses dynamic loss scaling)", default=False)
    seed: int = config_field("seed for init, shuffling and negative sampling", default=42)
    log_every: int = config_field("report metrics every N optimizer steps", default=10)
    checkpoint_every: int = config_field("checkpoint every N optimizer steps; 0 = final only", default=0)
    resume_from: str = config_field("checkpoint dir to resume from ('' = none); must be trusted: the DeepSpeed engine "
                             "unpickles it, which can run code", default="")
    storage_path: str = config_field("Ray Train storage path ('' = <output_dir>/ray)", default="")
    max_failures: int = config_field("Ray Train worker-failure retries (a lost node counts as one); -1 = unlimited",
                              default=0)
    ray_train_metrics: bool = config_field(
        "export Ray Train's own Prometheus metrics (extra controller/worker callbacks; off saves CPU on small nodes)", default=False
    )

    def __post_init__(self) -> None:
        check_choice("task", self.task, tuple(LOSS_DEFAULTS))
        name, temperature = LOSS_DEFAULTS[self.task]
        self.loss = dataclasses.replace(self.loss, name=self.loss.name or name,
                                        temperature=self.loss.temperature or temperature)
        if self.loss.name not in TASK_LOSSES[self.task]:
            raise ConfigError(f"loss.name={self.loss.name!r} is not a loss for task={self.task}; use "
                              f"{' or '.join(TASK_LOSSES[self.task])}", key="loss.name")
        for name in ("epochs", "batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.num_negatives < 0 or self.checkpoint_every < 0:
            raise ConfigError("num_negatives and checkpoint_every must be >= 0")
        if self.train_document_max_length < 0:
            raise ConfigError("train_document_max_length must be >= 0 (0 = the model's document max length)",
                              key="train_document_max_length")
        if self.train_document_max_length and self.task not in ("embedder", "colbert"):
            raise ConfigError(f"train_document_max_length cuts the documents of a bi-encoder or ColBERT; task={self.task} "
                              "reads (query, document) as one input: set reranker.max_length instead",
                              key="train_document_max_length")
        if self.grad_cache_chunk < 0:
            raise ConfigError("grad_cache_chunk must be >= 0 (0 = off)", key="grad_cache_chunk")
        if self.grad_cache_chunk and self.task != "embedder":
            raise ConfigError(f"grad_cache_chunk caches embedding gradients of a bi-encoder: task={self.task} scores "
                              "(query, document) pairs jointly; use task=embedder or grad_cache_chunk=0",
                              key="grad_cache_chunk")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are exclusive: pick one")
        if self.fp16 and self.engine.name == "ddp" and not self.scaling.use_gpu:
            raise ConfigError("fp16 needs a GPU (scaling.use_gpu=true); on CPU use bf16")
        if self.scaling.elastic:
            self._check_elastic()

    def _check_elastic(self) -> None:
        """An elastic run must split its global micro-batch evenly at every world size it may get,
        resume its engine state at another world size, and survive losing a worker."""
        lo, hi = self.scaling.min_workers, self.scaling.max_workers
        total = self.batch_size * hi
        bad = [w for w in range(lo, hi + 1) if total % w]
        if bad:
            need = math.lcm(*range(lo, hi + 1))
            fits = next(b for b in range(self.batch_size, self.batch_size + need + 1) if (b * hi) % need == 0)
            raise ConfigError(
                f"batch_size={self.batch_size} x scaling.num_workers max {hi} = {total} records per micro-step cannot "
                f"be split evenly over {', '.join(map(str, bad))} worker(s) (scaling.num_workers=[{lo}, {hi}]): pick "
                f"batch_size so that batch_size x {hi} is divisible by every worker count in [{lo}, {hi}] "
                f"(e.g. batch_size={fits})", key="batch_size")
        if self.engine.name == "deepspeed" and self.engine.zero_stage > 0:
            raise ConfigError(
                f"engine.zero_stage={self.engine.zero_stage} with elastic scaling.num_workers=[{lo}, {hi}]: a ZeRO "
                "checkpoint holds one optimizer partition per worker and is not resumed at another world size; "
                "use engine.name=ddp (or zero_stage 0) for elastic runs", key="engine.zero_stage")
        if self.max_failures == 0:
            raise ConfigError(
                f"max_failures=0 with elastic scaling.num_workers=[{lo}, {hi}]: a lost worker would end the run "
                "instead of shrinking it; set max_failures >= 1 (or -1 = unlimited)", key="max_failures")

    def worker_batch_size(self, world_size: int) -> int:
        """Records one worker takes per micro-step at ``world_size`` workers.

        Fixed ``num_workers``: ``batch_size``.  Elastic ``[min, max]``: the global micro-batch
        ``batch_size x max`` split evenly (``__post_init__`` checked every world size in range), so
        every world size trains on the same global micro-batches in the same order.
        """
        if not self.scaling.elastic:
            return self.batch_size
        total = self.batch_size * self.scaling.max_workers
        if world_size < 1 or total % world_size:
            raise ConfigError(f"batch_size: {total} records per micro-step do not split over {world_size} workers",
                              key="batch_size")
        return total // world_size


@dataclass
class EvalConfig:
    batch_size: int = config_field("encode batch size", default=64)
    top_k: int = config_field("documents retrieved per query", default=100)
    bf16: bool = config_field("bf16 autocast while encoding", default=False)
    max_queries: int = config_field("evaluate only the first N queries (0 = all)", default=0)
    num_shards: int = config_field("corpus shards the Ray Data encode actors write (the unit of work one actor takes)",
                            default=4)
    actors: int = config_field("encode/search actors (0 = size from the cluster, as `distributed-ir index` does)", default=0)
    use_gpu: bool = config_field("encode and search on GPU actors (one GPU each)", default=False)
    searchers: int = config_field("searcher actors for eval and mining searches, each holding a group of the index's "
                                  "parts (0 = one per part; 1 = the query actors hold every part), as `distributed-ir "
                                  "search --searchers`", default=0)
    index_type: str = config_field("FAISS factory string of the pipeline's indexes (as `distributed-ir index "
                                   "--index-type`: Flat is exact; IVF/PQ trained on a sample for large corpora)",
                                   default="Flat")
    index_shards: int = config_field("FAISS parts of each pipeline index, each built by its own Ray task and searched "
                                     "by its own searcher actor (as `distributed-ir index --index-shards`)", default=1)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.top_k < 1 or self.max_queries < 0:
            raise ConfigError("eval: batch_size and top_k must be >= 1, max_queries >= 0")
        if self.num_shards < 1 or self.actors < 0 or self.searchers < 0 or self.index_shards < 1:
            raise ConfigError("eval: num_shards and index_shards must be >= 1, actors and searchers >= 0")


@dataclass
class MiningConfig:
    enabled: bool = config_field("mine hard negatives with the base model before training", default=False)
    rank_start: int = config_field("first rank (0-based) eligible as a negative", default=10)
    rank_end: int = config_field("ranks before this are eligible", default=100)
    per_query: int = config_field("negatives kept per query", default=8)

    def __post_init__(self) -> None:
        if not 0 <= self.rank_start < self.rank_end:
            raise ConfigError("mining: need 0 <= rank_start < rank_end")
        if self.per_query < 1:
            raise ConfigError("mining.per_query must be >= 1")


RERANKER_TASKS = ("cross_encoder", "colbert", "llm_reranker")
# = distributed_ir.models.precision.PRECISIONS (a test checks; models never import this module)
PRECISION_CHOICES = ("auto", "fp32", "bf16", "bf16w", "fp16", "int8", "openvino")


# A pipeline reranker's training defaults: keys a config leaves out keep these, not TrainConfig's.
# Only the keys that differ are listed, so the rest (the loss too) follow the task like any TrainConfig.
_RERANKER_TRAIN_DEFAULTS = {"task": "cross_encoder", "model": {"name_or_path": "finetuned"}, "batch_size": 8,
                            "num_negatives": 7}


@dataclass
class PipelineRerankerMiningConfig:
    rank_start: int = config_field("first rank (0-based) of the fine-tuned model's run eligible as a negative", default=0)
    rank_end: int = config_field("ranks before this are eligible (the candidates the reranker will see)", default=30)
    per_query: int = config_field("negatives kept per training query", default=7)

    def __post_init__(self) -> None:
        if not 0 <= self.rank_start < self.rank_end:
            raise ConfigError("mining: need 0 <= rank_start < rank_end", key="mining.rank_start")
        if self.per_query < 1:
            raise ConfigError("mining.per_query must be >= 1", key="mining.per_query")


@dataclass
class PipelineRerankerConfig:
    """Pipeline stage after the fine-tuned eval: mine with the fine-tuned embedder -> train a
    reranker on Ray Train -> rerank the fine-tuned run's top_k with Ray Data (-> fuse)."""

    enabled: bool = config_field("run the reranker stage", default=False)
    train: TrainConfig = config_field(
        "the reranker's training config (task cross_encoder | colbert | llm_reranker; loss listwise | bce); "
        "model.name_or_path 'finetuned' = the embedder this pipeline just fine-tuned; train_path and "
        "output_dir are set by the pipeline", defaults=_RERANKER_TRAIN_DEFAULTS,
        default_factory=lambda: from_dict(TrainConfig, _RERANKER_TRAIN_DEFAULTS, "reranker.train"))
    mining: PipelineRerankerMiningConfig = field(default_factory=PipelineRerankerMiningConfig)
    top_k: int = config_field("candidates of the fine-tuned run reranked per eval query", default=100)
    batch_size: int = config_field("reranker batch size (pairs) per actor", default=32)
    precision: str = config_field("auto (the fastest of fp32 / bf16 / bf16w / int8 / openvino, or fp16 / bf16 / bf16w on GPU, measured "
                           "on the host and passing min_cosine) | fp32 | bf16 (autocast) | bf16w (bfloat16 weights) | "
                           "fp16 (GPU) | int8 | openvino (CPU; cross-encoder, ColBERT) while reranking", default="auto")
    min_cosine: float = config_field("auto's quality gate: agreement of the scores with fp32's on the calibration pairs "
                              "(cosine of the mean-centred scores)", default=0.99)
    actors: int = config_field("reranker actors (0 = from cluster resources); GPUs when train.scaling.use_gpu",
                        default=0)
    fuse: float | None = config_field("also a 'fused' row: w * z(reranker) + (1 - w) * z(fine-tuned); null = off",
                               default=None)
    compile: bool = config_field("torch.compile the reranker in each actor (pays a compile first; faster on large "
                          "reranks)", default=False)

    def __post_init__(self) -> None:
        t = self.train
        if t.task not in RERANKER_TASKS:
            raise ConfigError(f"reranker.train.task={t.task!r} is not a reranker; expected one of "
                              f"{', '.join(RERANKER_TASKS)}", key="train.task")
        if t.train_path:
            raise ConfigError("reranker.train.train_path: the pipeline mines the reranker's records itself "
                              "(reranker.mining); leave it empty", key="train.train_path")
        check_choice("reranker.precision", self.precision, PRECISION_CHOICES)
        if not 0.0 < self.min_cosine <= 1.0:
            raise ConfigError(f"reranker.min_cosine={self.min_cosine}: expected a value in (0, 1]", key="min_cosine")
        if self.top_k < 1 or self.batch_size < 1 or self.actors < 0:
            raise ConfigError("reranker: top_k and batch_size must be >= 1, actors >= 0", key="top_k")
        if self.fuse is not None and not 0.0 <= self.fuse <= 1.0:
            raise ConfigError(f"reranker.fuse={self.fuse}: the fusion weight must be in [0, 1]", key="fuse")


@dataclass
class HybridConfig:
    """BM25 (bm25s) as a first stage of its own (row ``bm25``) and fused with the fine-tuned dense
    run (row ``hybrid``)."""

    enabled: bool = config_field("add the bm25 and hybrid rows", default=False)
    weight: float = config_field("dense weight in the fusion: 1 = dense only, 0 = BM25 only", default=0.5)
    method: str = config_field("convex (min-max normalised scores) | rrf (reciprocal rank fusion)", default="convex")
    rrf_k: int = config_field("RRF constant k in 1 / (k + rank)", default=60)
    k1: float = config_field("BM25 k1 (Pyserini's BEIR baseline: 0.9)", default=0.9)
    b: float = config_field("BM25 b (Pyserini's BEIR baseline: 0.4)", default=0.4)
    shards: int = config_field("BM25 index shards, each its own index built in a Ray task: shard p holds the staged "
                               "corpus shards i with i % shards == p (at most eval.num_shards)", default=1)
    rerank: bool = config_field("the reranker stage reranks the hybrid run's top_k instead of the dense run's",
                         default=True)

    def __post_init__(self) -> None:
        check_choice("hybrid.method", self.method, ("convex", "rrf"))
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"hybrid.weight={self.weight}: must be in [0, 1]", key="hybrid.weight")
        if self.rrf_k < 1 or self.shards < 1 or self.k1 < 0 or not 0.0 <= self.b <= 1.0:
            raise ConfigError("hybrid: need rrf_k >= 1, shards >= 1, k1 >= 0 and 0 <= b <= 1", key="hybrid.k1")


@dataclass
class DistillConfig:
    """Pipeline stage between mining and training: a saved reranker (the teacher) scores every
    training record's positives and negatives on a Ray Data actor pool; the embedder then trains
    on those scores (``train.loss.name: distill`` or ``train.loss.distill_weight > 0``)."""

    enabled: bool = config_field("score the training records with the teacher before training", default=False)
    teacher: str = config_field("the teacher: a saved reranker folder (cross_encoder | colbert | llm_reranker; what "
                                "`distributed-ir rerank --model` loads); required when enabled", default="")
    rescore: bool = config_field("score records that already hold `scores` (prepared train.train_path records) "
                                 "again; false = keep the given scores", default=False)
    batch_size: int = config_field("teacher batch size (pairs) per actor", default=32)
    precision: str = config_field("auto (the fastest precision measured on the host that passes min_cosine) | fp32 | "
                                  "bf16 (autocast) | bf16w (bfloat16 weights) | fp16 (GPU) | int8 | openvino (CPU; "
                                  "cross-encoder, ColBERT) while scoring", default="auto")
    min_cosine: float = config_field("auto's quality gate: agreement of the scores with fp32's on the calibration pairs",
                                     default=0.99)
    actors: int = config_field("teacher actors (0 = from cluster resources)", default=0)
    use_gpu: bool = config_field("score on GPU actors (one GPU each)", default=False)

    def __post_init__(self) -> None:
        if self.enabled and not self.teacher.strip():
            raise ConfigError("distill.teacher: distill.enabled needs a teacher, a saved reranker folder (what "
                              "`distributed-ir rerank --model` loads)", key="distill.teacher")
        check_choice("distill.precision", self.precision, PRECISION_CHOICES)
        if not 0.0 < self.min_cosine <= 1.0:
            raise ConfigError(f"distill.min_cosine={self.min_cosine}: expected a value in (0, 1]",
                              key="distill.min_cosine")
        if self.batch_size < 1 or self.actors < 0:
            raise ConfigError("distill: batch_size must be >= 1, actors >= 0", key="distill.batch_size")


@dataclass
class PipelineConfig:
    """(mine -> distill) -> train -> encode -> search -> evaluate on a BEIR dataset (-> mine -> train
    reranker -> rerank)."""

    data_dir: str = config_field("folder holding BEIR datasets ('' = $IR_DATA_DIR)", default="")
    dataset: str = config_field("BEIR dataset folder name under data_dir (one plain name: for cqadupstack/<x>, "
                         "point data_dir at the cqadupstack folder)", default="scifact")
    train_split: str = config_field("qrels split used for training", default="train")
    eval_split: str = config_field("qrels split used for evaluation", default="test")
    output_dir: str = config_field("where metrics.json, run.trec and the model go", default="outputs/pipeline")
    skip_base_eval: bool = config_field("do not evaluate the base model", default=False)
    input: InputConfig = field(default_factory=InputConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    reranker: PipelineRerankerConfig = field(default_factory=PipelineRerankerConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        for key in ("dataset", "train_split", "eval_split"):  # joined into paths under data_dir
            problem = name_problem(getattr(self, key))
            if problem:
                raise ConfigError(f"{key}={problem}", key=key)
        if self.reranker.enabled and self.reranker.top_k > self.eval.top_k:
            raise ConfigError(f"reranker.top_k={self.reranker.top_k} > eval.top_k={self.eval.top_k}: the reranker "
                              "can only rerank what the fine-tuned model retrieved", key="reranker.top_k")
        if self.distill.enabled:
            self._check_distill()

    def _check_distill(self) -> None:
        """The teacher's scores need records with negatives to score and a loss that reads them."""
        loss = self.train.loss
        if loss.name != "distill" and not loss.distill_weight:
            raise ConfigError(f"distill.enabled scores the training records, but train.loss (name={loss.name}, "
                              "distill_weight=0) does not use the scores: set train.loss.distill_weight > 0 "
                              "(InfoNCE + KL) or train.loss.name=distill", key="train.loss.distill_weight")
        if not self.mining.enabled and not self.train.train_path:
            raise ConfigError("distill.enabled: the teacher scores each query's positives against its hard "
                              "negatives; set mining.enabled=true (or train.train_path to triplet records)",
                              key="mining.enabled")
