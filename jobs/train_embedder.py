"""Ray job: fine-tune an embedder on Ray Train from a records file (pair / triplet / scored).

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/train_embedder.py --config my_train.yaml train_path=...
"""

from __future__ import annotations

import argparse

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import load_config
from distributed_ir.jobenv import announce, output_path
from distributed_ir.train.launch import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args()
    announce("train_embedder")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    cfg.output_dir = output_path(cfg.output_dir)
    cfg.storage_path = output_path(cfg.storage_path)
    result = run_training(cfg)
    print(f"model: {result.model_path}  seconds: {result.seconds:.0f}  metrics: {result.metrics}")


if __name__ == "__main__":
    main()
