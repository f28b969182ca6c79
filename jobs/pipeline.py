"""Ray job: the whole retrieval pipeline on a BEIR dataset (train -> encode -> search -> evaluate).

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/scifact_minilm.yaml
"""

from __future__ import annotations

import argparse

from distributed_ir.config import PipelineConfig, load_config
from distributed_ir.pipeline import run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args()
    cfg = load_config(PipelineConfig, args.config, args.overrides)  # 1. config
    run_pipeline(cfg)  # 2. run: writes metrics.json, run.trec, the model


if __name__ == "__main__":
    main()
