"""Prepare Wikipedia-NQ (DPR release) -> BEIR folder, triplet records, Parquet corpus shards.

    python jobs/prepare_nq.py --input-dir dpr_data --out-dir $IR_DATA_DIR/nq-dpr --num-shards 64
    distributed-ir pipeline --config jobs/configs/nq_bge_base_en.yaml

The input folder holds biencoder-nq-train.json, optionally biencoder-nq-dev.json, and
psgs_w100.tsv (all streamed: the 21M-passage file is never loaded whole).
"""

from __future__ import annotations

import sys

from distributed_ir.data.nq import prepare_nq
from distributed_ir.data.prepare import job_parser, run_job


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__.splitlines()[0], "folder with biencoder-nq-*.json and psgs_w100.tsv")
    parser.add_argument("--num-shards", type=int, default=16, help="Parquet corpus shards (for distributed-ir index)")
    parser.add_argument("--negatives-per-query", type=int, default=8, help="hard negatives kept per question")
    parser.add_argument("--corpus-limit", type=int, default=0,
                        help="keep the first N passages plus every passage a question names (0 = all)")
    parser.add_argument("--passages", default="psgs_w100.tsv", help="passage file name inside --input-dir")
    return run_job("prepare_nq", parser, argv, lambda args: prepare_nq(
        input_dir=args.input_dir, out_dir=args.out_dir, num_shards=args.num_shards,
        negatives_per_query=args.negatives_per_query, corpus_limit=args.corpus_limit, passages=args.passages))


if __name__ == "__main__":
    sys.exit(main())
