"""Ray job: search an index built by jobs/index_corpus.py and write a TREC run.

    ray job submit --working-dir . -- python jobs/search_index.py \
        --index outputs/scifact_index --queries "$IR_DATA_DIR/scifact/queries.jsonl" --out outputs/run.trec
Takes the same flags as `distributed-ir search`.
"""

import sys

from distributed_ir.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
