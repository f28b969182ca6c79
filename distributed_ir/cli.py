"""``distributed-ir`` command line: train / index / search / mine / rerank / evaluate / pipeline.

Every command that takes ``--config FILE`` also takes ``key.path=value`` overrides.  ``index``,
``search``, ``mine`` and ``rerank`` read one typed config each
(:mod:`distributed_ir.command_configs`): their flags are its fields, and win over the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed_ir.command_configs import (
    COMMAND_CONFIGS,
    IndexCommandConfig,
    MineCommandConfig,
    RerankCommandConfig,
    SearchCommandConfig,
)
from distributed_ir.config import RERANKER_TASKS, PipelineConfig, TrainConfig
from distributed_ir.config_flags import add_flags, flag_values, missing
from distributed_ir.config_loader import ConfigError, load_config, to_dict
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
    out = Path(output_path(args.out)) if args.out else None  # relative: under $IR_OUTPUT_ROOT when set
    check = _input_check(args, out.resolve().parent if out else Path.cwd())
    qrels = load_qrels(args.qrels, check=check)
    _print_input(check.summary())
    result = evaluate(read_run(args.run), qrels, metrics)
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
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


def _cmd_index(cfg: IndexCommandConfig) -> int:
    from distributed_ir.index.pipeline import IndexOptions, build_faiss, check_inputs, encode_corpus
    from distributed_ir.index.storage import Location
    from distributed_ir.models.precision import flat_summary
    from distributed_ir.train.launch import init_ray

    opts = IndexOptions(**to_dict(cfg))
    check_inputs(opts)  # before the cluster: a missing corpus file costs no cluster start
    init_ray()
    manifest = encode_corpus(opts)
    _print_input(manifest["input"])
    index = build_faiss(opts.out, manifest, factory=opts.index_type, index_shards=opts.index_shards,
                        use_gpu=opts.use_gpu, start_timeout_s=opts.actor_start_timeout_s)
    run = {k: v for k, v in manifest["last_run"].items() if k != "precision"}  # details: manifest.json
    precision = flat_summary(manifest["last_run"]["precision"]) if "precision" in manifest["last_run"] else {}
    summary = {"docs": manifest["num_docs"], "indexed": index["ntotal"], **run, **precision,
               "index_type": opts.index_type, "index_shards": index["shards"],
               "index_bytes": sum(p["bytes"] for p in index["parts"]), "out": Location(opts.out).uri,
               **_flat_input(manifest["input"])}
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_search(cfg: SearchCommandConfig) -> int:
    from distributed_ir.data.intake import InputCheck
    from distributed_ir.index.search import search_index

    check = InputCheck(cfg.on_error, cfg.rejects_path or Path(cfg.out).resolve().parent / "rejects.jsonl")
    _, summary = search_index(index_dir=cfg.index, queries_path=cfg.queries, out=cfg.out, top_k=cfg.top_k,
                              qrels_path=cfg.qrels or None, batch_size=cfg.batch_size, precision=_policy(cfg),
                              use_gpu=cfg.use_gpu, check=check, actors=cfg.actors, searchers=cfg.searchers,
                              searcher_gpus=cfg.searcher_gpus, actor_start_timeout_s=cfg.actor_start_timeout_s)
    counts = summary.pop("input")
    _print_input(counts)
    print(json.dumps(summary | _flat_input(counts), indent=2))
    return 0


def _add_input_flags(p: argparse.ArgumentParser, default_rejects: str) -> None:
    p.add_argument("--on-error", choices=["raise", "skip"], default=None,
                   help="bad input rows: raise (default: stop with FILE:LINE: field) or skip them into the "
                        "rejects file; the summary shows input = accepted + rejected per file")
    p.add_argument("--rejects", default=None, help=f"rejects JSONL path (default {default_rejects})")


def _policy(cfg: SearchCommandConfig | MineCommandConfig | RerankCommandConfig):
    from distributed_ir.models.precision import PrecisionPolicy

    return PrecisionPolicy(cfg.precision, min_cosine=cfg.min_cosine, cache_dir=cfg.precision_cache,
                           calibration_texts=cfg.calibration_texts)


def _cmd_mine(cfg: MineCommandConfig) -> int:
    from distributed_ir.mining import mine_command
    from distributed_ir.train.launch import init_ray

    init_ray()
    summary = mine_command(index_dir=cfg.index, dataset_dir=cfg.dataset, split=cfg.split, out=cfg.out,
                           rank_start=cfg.rank_start, rank_end=cfg.rank_end, per_query=cfg.per_query, seed=cfg.seed,
                           batch_size=cfg.batch_size, precision=_policy(cfg), actors=cfg.actors,
                           searchers=cfg.searchers)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_rerank(cfg: RerankCommandConfig) -> int:
    from distributed_ir.eval.rerank import rerank_command
    from distributed_ir.train.launch import init_ray

    init_ray()
    report = rerank_command(model=cfg.model, run_path=cfg.run, dataset_dir=cfg.dataset, out=cfg.out,
                            top_k=cfg.top_k, split=cfg.split, batch_size=cfg.batch_size, precision=_policy(cfg),
                            actors=cfg.actors, use_gpu=cfg.use_gpu, fuse=cfg.fuse, compile=cfg.compile)
    print(json.dumps({k: report[k] for k in ("first_stage", "reranked", "fused", "speed") if k in report}, indent=2))
    return 0


def _typed_command(sub: argparse._SubParsersAction, name: str, summary: str, handler: Callable[[Any], int]) -> None:
    """A command whose flags, ``--config FILE`` keys and ``key=value`` overrides are one typed config."""
    cls = COMMAND_CONFIGS[name]
    p = sub.add_parser(name, help=summary)
    p.add_argument("--config", help=f"YAML config ({cls.__name__}: keys = the flags' names with '_'); "
                                    "flags and key=value overrides win over it")
    add_flags(p, cls)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=handler, command_parser=p)


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

    _typed_command(sub, "index", "encode a corpus with Ray Data into embedding shards and a FAISS index", _cmd_index)
    _typed_command(sub, "search", "search an index built by `index`; write a TREC run", _cmd_search)
    _typed_command(sub, "mine", "hard negatives from an index search (Ray Data over queries) -> triplet JSONL",
                   _cmd_mine)
    _typed_command(sub, "rerank", "rerank a TREC run's top-k with Ray Data actors; write run + metrics.json",
                   _cmd_rerank)

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line (``key=value`` overrides placed after the options included)."""
    parser = build_parser()
    # argparse binds a trailing `key=value ...` list only when it directly follows the other
    # positionals; collect overrides placed after options (`train embedder --config F a=b`) too.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in x or x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args


def command_config(args: argparse.Namespace) -> Any:
    """The typed config of ``index | search | mine | rerank``: the ``--config`` file, then the
    ``key=value`` overrides, then the flags given."""
    cls = COMMAND_CONFIGS[args.command]
    values, overrides = flag_values(args, cls)
    cfg = load_config(cls, args.config, list(args.overrides) + overrides, values)
    if missing(cfg):
        also = f" (or their keys in {args.config})" if args.config else ""
        args.command_parser.error(f"the following arguments are required: {', '.join(missing(cfg))}{also}")
    for name in ("out", "index"):  # relative output folders/files go under $IR_OUTPUT_ROOT when it is set
        if hasattr(cfg, name):
            setattr(cfg, name, output_path(getattr(cfg, name)))
    return cfg


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    args = parse_args(argv)
    try:
        return args.func(command_config(args) if args.command in COMMAND_CONFIGS else args)
    except (ConfigError, DataError, ActorStartTimeout) as e:
        print(f"distributed-ir {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
