"""``distributed-ir`` command line: train / evaluate / pipeline (index, search, rerank, mine follow).

Every command that takes ``--config FILE`` also takes ``key.path=value`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distributed_ir.config import ConfigError, PipelineConfig, TrainConfig, load_config
from distributed_ir.data.errors import DataError


def _cmd_train(args: argparse.Namespace) -> int:
    from distributed_ir.train.launch import run_training

    if args.kind != "embedder":
        raise ConfigError(f"train {args.kind!r}: only 'embedder' is available in this version")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if not cfg.train_path:
        raise ConfigError("train_path is empty: set it in the config or pass train_path=FILE")
    result = run_training(cfg)
    print(json.dumps({"model_path": str(result.model_path), "seconds": round(result.seconds, 1),
                      **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from distributed_ir.data.beir import load_qrels
    from distributed_ir.eval.metrics import DEFAULT_METRICS, evaluate, read_run

    metrics = tuple(args.metrics.split(",")) if args.metrics else DEFAULT_METRICS
    result = evaluate(read_run(args.run), load_qrels(args.qrels), metrics)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from distributed_ir.pipeline import run_pipeline

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data_dir={args.data}")
    run_pipeline(load_config(PipelineConfig, args.config, overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distributed-ir", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model on Ray Train")
    p.add_argument("kind", choices=["embedder"], help="what to train")
    p.add_argument("--config", required=False, help="YAML config (TrainConfig)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score a TREC run against qrels (trec_eval semantics)")
    p.add_argument("--run", required=True, help="TREC run file")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV or TREC qrels")
    p.add_argument("--out", help="write metrics JSON here")
    p.add_argument("--metrics", help="comma list, e.g. ndcg@10,mrr@10,recall@100,map@100")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("pipeline", help="train -> encode -> search -> evaluate on a BEIR dataset")
    p.add_argument("--config", required=True, help="YAML config (PipelineConfig)")
    p.add_argument("--data", help="folder holding BEIR datasets (default $IR_DATA_DIR)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.set_defaults(func=_cmd_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"distributed-ir {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
