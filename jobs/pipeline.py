"""Ray job: the whole retrieval pipeline on a BEIR dataset (train -> encode -> search -> evaluate -> rerank).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/pipeline.py --config jobs/configs/scifact_minilm.yaml data_dir=/abs/path/to/beir
Relative output paths resolve under $IR_OUTPUT_ROOT when set (see distributed_ir/jobenv.py).
"""

from __future__ import annotations

import argparse

from distributed_ir.config import PipelineConfig
from distributed_ir.config_loader import load_config
from distributed_ir.jobenv import announce, output_path
from distributed_ir.pipeline import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args()
    announce("pipeline")
    cfg = load_config(PipelineConfig, args.config, args.overrides)  # 1. config
    cfg.output_dir = output_path(cfg.output_dir)
    cfg.train.storage_path = output_path(cfg.train.storage_path)
    cfg.reranker.train.storage_path = output_path(cfg.reranker.train.storage_path)
    run_pipeline(cfg)  # 2. run: writes metrics.json, run*.trec, the models


if __name__ == "__main__":
    main()
