"""Prepare T2Ranking: collection/queries/qrels TSVs -> BEIR folder + pair/triplet records.

    python jobs/prepare_t2ranking.py --input-dir T2Ranking/data --out-dir $IR_DATA_DIR/t2ranking --num-shards 16
    distributed-ir pipeline --config jobs/configs/t2ranking_bge_base_zh.yaml
"""

from __future__ import annotations

import sys

from distributed_ir.data.prepare import job_parser, run_job
from distributed_ir.data.t2ranking import prepare_t2ranking


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__.splitlines()[0], "folder with collection.tsv, queries.*.tsv, qrels*.tsv")
    parser.add_argument("--qrels", default="retrieval", choices=["retrieval", "graded"],
                        help="qrels.retrieval.*.tsv (positives) or graded qrels.*.tsv")
    parser.add_argument("--min-relevant", type=int, default=2, help="lowest grade that counts as relevant (1-3)")
    parser.add_argument("--negatives-per-query", type=int, default=8, help="judged non-relevant passages per triplet")
    parser.add_argument("--num-shards", type=int, default=0, help="also write the corpus as N Parquet shards")
    parser.add_argument("--drop-unknown", action="store_true",
                        help="count and drop qrels rows naming unknown ids instead of stopping")
    parser.add_argument("--seed", type=int, default=0)
    return run_job("prepare_t2ranking", parser, argv, lambda args: prepare_t2ranking(
        input_dir=args.input_dir, out_dir=args.out_dir, qrels_source=args.qrels, min_relevant=args.min_relevant,
        negatives_per_query=args.negatives_per_query, num_shards=args.num_shards, drop_unknown=args.drop_unknown,
        seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())
