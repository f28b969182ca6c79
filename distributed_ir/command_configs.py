"""One typed config per single-stage command: ``distributed-ir index | search | mine | rerank``.

Each field is one of the command's flags (:mod:`distributed_ir.config_flags` builds them) and one
key of its ``--config`` YAML; ``key=value`` overrides and flags go over the file, flags last.
The YAML keys are the field names: ``--actor-resource NAME=AMOUNT`` is ``actor_resources:
{NAME: AMOUNT}``, ``--actor-start-timeout`` is ``actor_start_timeout_s``, ``--rejects`` is
``rejects_path``; every other flag is its key with ``-`` for ``_``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distributed_ir.config import PRECISION_CHOICES
from distributed_ir.config_flags import flag_field
from distributed_ir.config_loader import ConfigError, check_choice
from distributed_ir.data.intake import MAX_TEXT_BYTES

ON_ERROR_CHOICES = ("raise", "skip")


def _precision() -> Any:
    return flag_field("auto (default): measure fp32, bf16 autocast, bf16w (bfloat16 weights), int8 and "
                      "openvino (CPU) or fp16/bf16/bf16w (GPU) on the first inputs, keep the fastest that passes the quality gate "
                      "(cached per host and model); or force one",
                      choices=PRECISION_CHOICES, default="auto")


def _min_cosine() -> Any:
    return flag_field("auto's quality gate: cosine to fp32 on the calibration batch (default 0.99)", default=0.99)


def _precision_cache() -> Any:
    return flag_field("where int8 exports and auto's decisions are cached (default $DIR_PRECISION_CACHE, "
                      "else ~/.cache/distributed-ir/precision)", default="")


def _calibration_texts() -> Any:
    return flag_field("texts (or pairs) auto measures on: the first ones each actor sees (default 32)", default=32)


def _searchers() -> Any:
    return flag_field("searcher actors, each holding a group of the index's parts (0 = one per part; "
                      "1 = the query actors hold every part)", default=0)


def _on_error() -> Any:
    return flag_field("bad input rows: raise (default: stop with FILE:LINE: field) or skip them into the "
                      "rejects file; the summary shows input = accepted + rejected per file",
                      choices=ON_ERROR_CHOICES, default="raise")


def _rejects(where: str) -> Any:
    return flag_field(f"rejects JSONL path (default {where})", flag="--rejects", default="")


def _check(cfg: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """The checks every command shares: precision and on_error choices, auto's gate, counts."""
    check_choice("precision", cfg.precision, PRECISION_CHOICES)
    if not 0.0 < cfg.min_cosine <= 1.0:
        raise ConfigError(f"min_cosine={cfg.min_cosine}: expected a value in (0, 1]", key="min_cosine")
    if hasattr(cfg, "on_error"):
        check_choice("on_error", cfg.on_error, ON_ERROR_CHOICES)
    for name in ("batch_size", "calibration_texts", *positive):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 1", key=name)
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)}: must be >= 0", key=name)


@dataclass
class IndexCommandConfig:
    """``distributed-ir index``: encode a corpus with Ray Data into embedding shards and a FAISS index.
    The field names are :class:`distributed_ir.index.pipeline.IndexOptions`' own."""

    model: str = flag_field("saved embedder folder or 'default'", default="default")
    corpus: list[str] = flag_field("JSONL/Parquet files, folders or globs", required=True, default_factory=list)
    out: str = flag_field("output folder or pyarrow filesystem URI (file://, s3://, gs://); rerun to resume",
                          required=True, default="")
    index_type: str = flag_field("faiss index_factory string: Flat, IVF4096,Flat, HNSW32, ...", default="Flat")
    num_shards: int = flag_field("embedding shards: units of work per encode actor and of resume (use several per "
                                 "actor)", default=4)
    index_shards: int = flag_field("FAISS indexes to split the corpus over (built in parallel Ray tasks, searched "
                                   "one at a time; at most --num-shards)", default=1)
    batch_size: int = flag_field("documents per encode batch (default 64)", default=64)
    precision: str = _precision()
    min_cosine: float = _min_cosine()
    precision_cache: str = _precision_cache()
    calibration_texts: int = _calibration_texts()
    use_gpu: bool = flag_field("one GPU per encode actor; FAISS on GPU", default=False)
    actors: int = flag_field("a fixed pool of this many encode actors (0 = autoscale: --min-actors..--max-actors)",
                             default=0)
    min_actors: int = flag_field("encode actors to start with (default 1)", default=0)
    max_actors: int = flag_field("encode actors the pool may grow to as the cluster has room (default: one per "
                                 "shard)", default=0)
    actor_resources: dict[str, float] = flag_field(
        "custom Ray resource each encode actor requests (repeatable), e.g. encoder=1", flag="--actor-resource",
        metavar="NAME=AMOUNT", default_factory=dict)
    actor_start_timeout_s: int = flag_field(
        "wait this long for the first encode actors when the cluster lacks what they ask for (GPU, "
        "--actor-resource) so an autoscaler can add nodes; then fail (default 600)", flag="--actor-start-timeout",
        metavar="SECONDS", default=600)
    max_text_bytes: int = flag_field("reject documents longer than this many UTF-8 bytes (default 1 MiB)",
                                     default=MAX_TEXT_BYTES)
    on_error: str = _on_error()
    rejects_path: str = _rejects("<out>/rejects.jsonl")

    def __post_init__(self) -> None:
        _check(self, positive=("num_shards", "index_shards", "max_text_bytes"),
               non_negative=("actors", "min_actors", "max_actors", "actor_start_timeout_s"))


@dataclass
class SearchCommandConfig:
    """``distributed-ir search``: search an index built by ``index``; write a TREC run."""

    index: str = flag_field("the --out folder or URI of `distributed-ir index`", required=True, default="")
    queries: str = flag_field("BEIR queries.jsonl", required=True, default="")
    qrels: str = flag_field("only search the queries in these qrels", default="")
    out: str = flag_field("TREC run file to write", required=True, default="")
    top_k: int = flag_field("documents retrieved per query (default 100)", default=100)
    batch_size: int = flag_field("queries per encode batch (default 64)", default=64)
    precision: str = _precision()
    min_cosine: float = _min_cosine()
    precision_cache: str = _precision_cache()
    calibration_texts: int = _calibration_texts()
    use_gpu: bool = flag_field("encode the queries and search on GPU", default=False)
    actors: int = flag_field("query encode actors (0 = one per query batch, as the cluster has room)", default=0)
    searchers: int = _searchers()
    searcher_gpus: float = flag_field("GPU share each searcher actor requests (0 = CPU FAISS)", default=0.0)
    actor_start_timeout_s: int = flag_field(
        "wait this long for the first actors when the cluster lacks what they ask for (an autoscaler can add "
        "nodes); then fail (default 600)", flag="--actor-start-timeout", metavar="SECONDS", default=600)
    on_error: str = _on_error()
    rejects_path: str = _rejects("rejects.jsonl beside --out")

    def __post_init__(self) -> None:
        _check(self, positive=("top_k",), non_negative=("actors", "searchers", "searcher_gpus", "actor_start_timeout_s"))


@dataclass
class MineCommandConfig:
    """``distributed-ir mine``: hard negatives from an index search (Ray Data over queries) -> triplet JSONL."""

    index: str = flag_field("the --out folder of `distributed-ir index`", required=True, default="")
    dataset: str = flag_field("BEIR dataset folder (corpus, queries, qrels/)", required=True, default="")
    split: str = flag_field("qrels split whose queries are mined", default="train")
    out: str = flag_field("triplet JSONL to write (counts go to OUT.counts.json)", required=True, default="")
    rank_start: int = flag_field("first eligible rank (0-based)", default=10)
    rank_end: int = flag_field("ranks before this are eligible", default=100)
    per_query: int = flag_field("negatives kept per query", default=8)
    seed: int = flag_field("seed for sampling the kept negatives (default 42)", default=42)
    batch_size: int = flag_field("queries per encode batch (default 64)", default=64)
    precision: str = _precision()
    min_cosine: float = _min_cosine()
    precision_cache: str = _precision_cache()
    calibration_texts: int = _calibration_texts()
    actors: int = flag_field("query search actors (0 = one per query batch, as the cluster has room)", default=0)
    searchers: int = _searchers()

    def __post_init__(self) -> None:
        _check(self, positive=("per_query",), non_negative=("actors", "searchers"))
        if not 0 <= self.rank_start < self.rank_end:
            raise ConfigError(f"rank_start={self.rank_start}, rank_end={self.rank_end}: need 0 <= rank_start < "
                              "rank_end", key="rank_start")


@dataclass
class RerankCommandConfig:
    """``distributed-ir rerank``: rerank a TREC run's top-k with Ray Data actors; write run + metrics.json."""

    model: str = flag_field("saved reranker folder (cross-encoder, ColBERT or LLM)", required=True, default="")
    run: str = flag_field("first-stage TREC run", required=True, default="")
    dataset: str = flag_field("BEIR dataset folder", required=True, default="")
    split: str = flag_field("qrels split to evaluate", default="test")
    top_k: int = flag_field("candidates reranked per query", default=100)
    out: str = flag_field("output folder: run.trec + metrics.json", required=True, default="")
    batch_size: int = flag_field("pairs per forward pass", default=32)
    precision: str = _precision()
    min_cosine: float = _min_cosine()
    precision_cache: str = _precision_cache()
    calibration_texts: int = _calibration_texts()
    actors: int = flag_field("a fixed pool of this many reranker actors (0 = autoscale from 1 as the cluster has "
                             "room)", default=0)
    use_gpu: bool = flag_field("one GPU per reranker actor", default=False)
    fuse: float | None = flag_field("also write run_fused.trec: W * z(reranker) + (1 - W) * z(first stage) per query",
                                    metavar="W", default=None)
    compile: bool = flag_field("torch.compile the reranker in each actor (faster on large reranks; pays a compile "
                               "first)", default=False)

    def __post_init__(self) -> None:
        _check(self, positive=("top_k",), non_negative=("actors",))
        if self.fuse is not None and not 0.0 <= self.fuse <= 1.0:
            raise ConfigError(f"fuse={self.fuse}: the fusion weight must be in [0, 1]", key="fuse")


COMMAND_CONFIGS: dict[str, type] = {"index": IndexCommandConfig, "search": SearchCommandConfig,
                                    "mine": MineCommandConfig, "rerank": RerankCommandConfig}
