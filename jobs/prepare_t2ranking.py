"""Prepare T2Ranking: collection/queries/qrels TSVs -> BEIR folder + pair/triplet records.

    python jobs/prepare_t2ranking.py --input-dir T2Ranking/data --out-dir $IR_DATA_DIR/t2ranking --num-shards 16
    distributed-ir pipeline --config jobs/configs/t2ranking_bge_base_zh.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

from distributed_ir.data.errors import DataError
from distributed_ir.data.t2ranking import prepare_t2ranking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-dir", required=True, help="folder with collection.tsv, queries.*.tsv, qrels*.tsv")
    parser.add_argument("--out-dir", required=True, help="BEIR folder to write (the pipeline's data_dir/dataset)")
    parser.add_argument("--qrels", default="retrieval", choices=["retrieval", "graded"],
                        help="qrels.retrieval.*.tsv (positives) or graded qrels.*.tsv")
    parser.add_argument("--min-relevant", type=int, default=2, help="lowest grade that counts as relevant (1-3)")
    parser.add_argument("--negatives-per-query", type=int, default=8, help="judged non-relevant passages per triplet")
    parser.add_argument("--num-shards", type=int, default=0, help="also write the corpus as N Parquet shards")
    parser.add_argument("--drop-unknown", action="store_true",
                        help="count and drop qrels rows naming unknown ids instead of stopping")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        stats = prepare_t2ranking(args.input_dir, args.out_dir, args.qrels, args.min_relevant,
                                  args.negatives_per_query, args.num_shards, args.drop_unknown, args.seed)
    except DataError as e:
        print(f"prepare_t2ranking: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
