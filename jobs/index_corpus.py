"""Ray job: encode a corpus with Ray Data into embedding shards + a FAISS index (resumable).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/index_corpus.py \
        --model default --corpus "$IR_DATA_DIR/scifact/corpus.jsonl" --out outputs/scifact_index
Takes the same flags as `distributed-ir index`.
"""

import sys

from distributed_ir.cli import main
from distributed_ir.jobenv import announce

if __name__ == "__main__":
    announce("index_corpus")
    sys.exit(main(["index", *sys.argv[1:]]))
