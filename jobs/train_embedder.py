"""Ray job: fine-tune an embedder on Ray Train from a records file (pair / triplet / scored).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/train_embedder.py --config my_train.yaml train_path=...
Takes the same arguments as `distributed-ir train embedder`.
"""

import sys

from distributed_ir.cli import main
from distributed_ir.jobenv import announce

if __name__ == "__main__":
    announce("train_embedder")
    sys.exit(main(["train", "embedder", *sys.argv[1:]]))
