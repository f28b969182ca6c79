"""Ray job: search an index built by jobs/index_corpus.py and write a TREC run.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/search_index.py \
        --index outputs/scifact_index --queries "$IR_DATA_DIR/scifact/queries.jsonl" --out outputs/run.trec
Takes the same flags as `distributed-ir search`.
"""

import sys

from distributed_ir.cli import main
from distributed_ir.jobenv import announce

if __name__ == "__main__":
    announce("search_index")
    sys.exit(main(["search", *sys.argv[1:]]))
