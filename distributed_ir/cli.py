"""``distributed-ir`` command line: train / index / search / mine / rerank / evaluate / pipeline.

Every command that takes ``--config FILE`` also takes ``key.path=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distributed_ir.config import (
    PRECISION_CHOICES,
    RERANKER_TASKS,
    ConfigError,
    PipelineConfig,
    TrainConfig,
    load_config,
)
from distributed_ir.data.errors import DataError
from distributed_ir.index.actors import ActorStartTimeout
from distributed_ir.jobenv import output_path


def _input_overrides(args: argparse.Namespace) -> list[str]:
    """``--on-error`` / ``--rejects`` as config overrides (they win over the config file)."""
    extra = [f"input.on_error={args.on_error}"] if args.on_error else []
    return extra + ([f"input.rejects_path={Path(args.rejects).resolve()}"] if args.rejects else [])


def _input_check(args: argparse.Namespace, default_dir: Path):
    from distributed_ir.data.intake import InputCheck

    return InputCheck(args.on_error or "raise", args.rejects or default_dir / "rejects.jsonl")


def _flat_input(summary: dict) -> dict:
    """Top-level keys for a command's JSON summary (kept flat: scripts parse the last object)."""
    out = {"input_rows": summary["input"], "accepted": summary["accepted"], "rejected": summary["rejected"]}
    return out | ({"rejects": summary["rejects"]} if "rejects" in summary else {})


def _print_input(summary: dict) -> None:
    from distributed_ir.data.intake import summary_line

    print(summary_line(summary), file=sys.stderr, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from distributed_ir.train.launch import run_training

    cfg = load_config(TrainConfig, args.config, list(args.overrides) + _input_overrides(args))
    if args.kind == "reranker" and cfg.task not in RERANKER_TASKS:
        raise ConfigError(f"train reranker: task={cfg.task!r}; expected one of {', '.join(RERANKER_TASKS)}")
    if args.kind == "embedder" and cfg.task != "embedder":
        raise ConfigError(f"task={cfg.task!r} is a reranker: run `distributed-ir train reranker`")
    if not cfg.train_path:
        raise ConfigError("train_path is empty: set it in the config or pass train_path=FILE")
    cfg.output_dir, cfg.storage_path = output_path(cfg.output_dir), output_path(cfg.storage_path)
    result = run_training(cfg)
    print(json.dumps({"model_path": str(result.model_path), "seconds": round(result.seconds, 1),
                      **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
                      **_flat_input(result.input)}, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from distributed_ir.data.beir import load_qrels
    from distributed_ir.eval.metrics import DEFAULT_METRICS, evaluate, read_run

    metrics = tuple(args.metrics.split(",")) if args.metrics else DEFAULT_METRICS
    check = _input_check(args, Path(args.out).resolve().parent if args.out else Path.cwd())
    qrels = load_qrels(args.qrels, check=check)
    _print_input(check.summary())
    result = evaluate(read_run(args.run), qrels, metrics)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from distributed_ir.pipeline import run_pipeline

    overrides = list(args.overrides) + _input_overrides(args)
    if args.data:
        overrides.append(f"data_dir={args.data}")
    cfg = load_config(PipelineConfig, args.config, overrides)
    cfg.output_dir, cfg.train.storage_path = output_path(cfg.output_dir), output_path(cfg.train.storage_path)
    cfg.reranker.train.storage_path = output_path(cfg.reranker.train.storage_path)
    run_pipeline(cfg)
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from distributed_ir.index.pipeline import IndexOptions, build_faiss, check_inputs, encode_corpus
    from distributed_ir.index.storage import Location
    from distributed_ir.train.launch import init_ray

    opts = IndexOptions(model=args.model, corpus=args.corpus, out=args.out, index_type=args.index_type,
                        num_shards=args.num_shards, index_shards=args.index_shards, batch_size=args.batch_size,
                        precision=args.precision, min_cosine=args.min_cosine, precision_cache=args.precision_cache,
                        calibration_texts=args.calibration_texts, use_gpu=args.use_gpu, actors=args.actors,
                        min_actors=args.min_actors, max_actors=args.max_actors,
                        actor_start_timeout_s=args.actor_start_timeout,
                        on_error=args.on_error or "raise", rejects_path=args.rejects or "",
                        max_text_bytes=args.max_text_bytes, actor_resources=_resources(args.actor_resource))
    check_inputs(opts)  # before the cluster: a missing corpus file costs no cluster start
    init_ray()
    manifest = encode_corpus(opts)
    _print_input(manifest["input"])
    index = build_faiss(opts.out, manifest, opts.index_type, opts.index_shards, opts.use_gpu)
    from distributed_ir.models.precision import flat_summary

    run = {k: v for k, v in manifest["last_run"].items() if k != "precision"}  # details: manifest.json
    precision = flat_summary(manifest["last_run"]["precision"]) if "precision" in manifest["last_run"] else {}
    summary = {"docs": manifest["num_docs"], "indexed": index["ntotal"], **run, **precision,
               "index_type": opts.index_type, "index_shards": index["shards"],
               "index_bytes": sum(p["bytes"] for p in index["parts"]), "out": Location(opts.out).uri,
               **_flat_input(manifest["input"])}
    print(json.dumps(summary, indent=2))
    return 0


def _resources(specs: list[str] | None) -> dict[str, float]:
    """``NAME=AMOUNT`` flags as a Ray resources dict."""
    out = {}
    for spec in specs or []:
        name, sep, amount = spec.partition("=")
        try:
            out[name] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise ConfigError(f"--actor-resource {spec!r}: expected NAME=AMOUNT, e.g. encoder=1")
    return out


def _cmd_search(args: argparse.Namespace) -> int:
    from distributed_ir.index.search import search_index

    check = _input_check(args, Path(args.out).resolve().parent)
    _, summary = search_index(args.index, args.queries, args.out, args.top_k, args.qrels, args.batch_size,
                              _policy(args), args.use_gpu, check=check)
    counts = summary.pop("input")
    _print_input(counts)
    print(json.dumps(summary | _flat_input(counts), indent=2))
    return 0


def _add_input_flags(p: argparse.ArgumentParser, default_rejects: str) -> None:
    p.add_argument("--on-error", choices=["raise", "skip"], default=None,
                   help="bad input rows: raise (default: stop with FILE:LINE: field) or skip them into the "
                        "rejects file; the summary shows input = accepted + rejected per file")
    p.add_argument("--rejects", default=None, help=f"rejects JSONL path (default {default_rejects})")


def _add_precision_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=list(PRECISION_CHOICES),
                   help="auto (default): measure fp32, bf16 and int8 (CPU) or fp16/bf16 (GPU) on the first inputs, "
                        "keep the fastest that passes the quality gate (cached per host and model); or force one")
    p.add_argument("--min-cosine", type=float, default=0.99,
                   help="auto's quality gate: cosine to fp32 on the calibration batch (default 0.99)")
    p.add_argument("--precision-cache", default="",
                   help="where int8 exports and auto's decisions are cached (default $DIR_PRECISION_CACHE, "
                        "else ~/.cache/distributed-ir/precision)")
    p.add_argument("--calibration-texts", type=int, default=32,
                   help="texts (or pairs) auto measures on: the first ones each actor sees (default 32)")


def _policy(args: argparse.Namespace):
    from distributed_ir.models.precision import PrecisionPolicy

    return PrecisionPolicy(args.precision, min_cosine=args.min_cosine, cache_dir=args.precision_cache,
                           calibration_texts=args.calibration_texts)


def _cmd_mine(args: argparse.Namespace) -> int:
    from distributed_ir.mining import mine_command
    from distributed_ir.train.launch import init_ray

    init_ray()
    summary = mine_command(args.index, args.dataset, args.split, args.out, args.rank_start, args.rank_end,
                           args.per_query, args.seed, args.batch_size, _policy(args), args.actors)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from distributed_ir.eval.rerank import rerank_command
    from distributed_ir.train.launch import init_ray

    init_ray()
    report = rerank_command(args.model, args.run, args.dataset, args.out, args.top_k, args.split, args.batch_size,
                            _policy(args), args.actors, args.use_gpu, args.fuse, compile=args.compile)
    print(json.dumps({k: report[k] for k in ("first_stage", "reranked", "fused", "speed") if k in report}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distributed-ir", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model on Ray Train")
    p.add_argument("kind", choices=["embedder", "reranker"],
                   help="what to train (reranker: task=cross_encoder | colbert | llm_reranker in the config)")
    p.add_argument("--config", required=False, help="YAML config (TrainConfig)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    _add_input_flags(p, "<output_dir>/rejects.jsonl")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("index", help="encode a corpus with Ray Data into embedding shards and a FAISS index")
    p.add_argument("--model", default="default", help="saved embedder folder or 'default'")
    p.add_argument("--corpus", required=True, nargs="+", help="JSONL/Parquet files, folders or globs")
    p.add_argument("--out", required=True,
                   help="output folder or pyarrow filesystem URI (file://, s3://, gs://); rerun to resume")
    p.add_argument("--index-type", default="Flat", help="faiss index_factory string: Flat, IVF4096,Flat, HNSW32, ...")
    p.add_argument("--num-shards", type=int, default=4,
                   help="embedding shards: units of work per encode actor and of resume (use several per actor)")
    p.add_argument("--index-shards", type=int, default=1,
                   help="FAISS indexes to split the corpus over (built in parallel Ray tasks, searched one at a time; "
                        "at most --num-shards)")
    p.add_argument("--batch-size", type=int, default=64)
    _add_precision_flags(p)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per encode actor; FAISS on GPU")
    p.add_argument("--actors", type=int, default=0, help="a fixed pool of this many encode actors (0 = autoscale: "
                                                          "--min-actors..--max-actors)")
    p.add_argument("--min-actors", type=int, default=0, help="encode actors to start with (default 1)")
    p.add_argument("--max-actors", type=int, default=0,
                   help="encode actors the pool may grow to as the cluster has room (default: one per shard)")
    p.add_argument("--actor-resource", action="append", metavar="NAME=AMOUNT",
                   help="custom Ray resource each encode actor requests (repeatable), e.g. encoder=1")
    p.add_argument("--actor-start-timeout", type=int, default=600, metavar="SECONDS",
                   help="wait this long for the first encode actors when the cluster lacks what they ask for "
                        "(GPU, --actor-resource) so an autoscaler can add nodes; then fail (default 600)")
    p.add_argument("--max-text-bytes", type=int, default=1 << 20,
                   help="reject documents longer than this many UTF-8 bytes (default 1 MiB)")
    _add_input_flags(p, "<out>/rejects.jsonl")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("search", help="search an index built by `index`; write a TREC run")
    p.add_argument("--index", required=True, help="the --out folder or URI of `distributed-ir index`")
    p.add_argument("--queries", required=True, help="BEIR queries.jsonl")
    p.add_argument("--qrels", help="only search the queries in these qrels")
    p.add_argument("--out", required=True, help="TREC run file to write")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    _add_precision_flags(p)
    p.add_argument("--use-gpu", action="store_true")
    _add_input_flags(p, "rejects.jsonl beside --out")
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("mine", help="hard negatives from an index search (Ray Data over queries) -> triplet JSONL")
    p.add_argument("--index", required=True, help="the --out folder of `distributed-ir index`")
    p.add_argument("--dataset", required=True, help="BEIR dataset folder (corpus, queries, qrels/)")
    p.add_argument("--split", default="train", help="qrels split whose queries are mined")
    p.add_argument("--out", required=True, help="triplet JSONL to write (counts go to OUT.counts.json)")
    p.add_argument("--rank-start", type=int, default=10, help="first eligible rank (0-based)")
    p.add_argument("--rank-end", type=int, default=100, help="ranks before this are eligible")
    p.add_argument("--per-query", type=int, default=8, help="negatives kept per query")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=64)
    _add_precision_flags(p)
    p.add_argument("--actors", type=int, default=0, help="search actors (0 = from cluster resources)")
    p.set_defaults(func=_cmd_mine)

    p = sub.add_parser("rerank", help="rerank a TREC run's top-k with Ray Data actors; write run + metrics.json")
    p.add_argument("--model", required=True, help="saved reranker folder (cross-encoder, ColBERT or LLM)")
    p.add_argument("--run", required=True, help="first-stage TREC run")
    p.add_argument("--dataset", required=True, help="BEIR dataset folder")
    p.add_argument("--split", default="test", help="qrels split to evaluate")
    p.add_argument("--top-k", type=int, default=100, help="candidates reranked per query")
    p.add_argument("--out", required=True, help="output folder: run.trec + metrics.json")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward pass")
    _add_precision_flags(p)
    p.add_argument("--actors", type=int, default=0,
                   help="a fixed pool of this many reranker actors (0 = autoscale from 1 as the cluster has room)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per reranker actor")
    p.add_argument("--fuse", type=float, default=None, metavar="W",
                   help="also write run_fused.trec: W * z(reranker) + (1 - W) * z(first stage) per query")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the reranker in each actor (faster on large reranks; pays a compile first)")
    p.set_defaults(func=_cmd_rerank)

    p = sub.add_parser("evaluate", help="score a TREC run against qrels (trec_eval semantics)")
    p.add_argument("--run", required=True, help="TREC run file")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV or TREC qrels")
    p.add_argument("--out", help="write metrics JSON here")
    p.add_argument("--metrics", help="comma list, e.g. ndcg@10,mrr@10,recall@100,map@100")
    _add_input_flags(p, "rejects.jsonl beside --out, else in the current folder")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("pipeline", help="train -> encode -> search -> evaluate on a BEIR dataset "
                                        "(-> mine -> train reranker -> rerank with reranker.enabled)")
    p.add_argument("--config", required=True, help="YAML config (PipelineConfig)")
    p.add_argument("--data", help="folder holding BEIR datasets (default $IR_DATA_DIR)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    _add_input_flags(p, "<output_dir>/rejects.jsonl")
    p.set_defaults(func=_cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    parser = build_parser()
    # argparse binds a trailing `key=value ...` list only when it directly follows the other
    # positionals; collect overrides placed after options (`train embedder --config F a=b`) too.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    for name in ("out", "index"):  # relative output folders/files go under $IR_OUTPUT_ROOT when it is set
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, output_path(getattr(args, name)))
    try:
        return args.func(args)
    except (ConfigError, DataError, ActorStartTimeout) as e:
        print(f"distributed-ir {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
