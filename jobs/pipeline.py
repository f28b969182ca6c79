"""Ray job: the whole retrieval pipeline on a BEIR dataset (train -> encode -> search -> evaluate -> rerank).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py --config jobs/configs/scifact_minilm.yaml data_dir=/abs/path/to/beir
Takes the same arguments as `distributed-ir pipeline`. Relative output paths resolve under
$IR_OUTPUT_ROOT when set (see distributed_ir/jobenv.py).
"""

import sys

from distributed_ir.cli import main
from distributed_ir.jobenv import announce

if __name__ == "__main__":
    announce("pipeline")
    sys.exit(main(["pipeline", *sys.argv[1:]]))
