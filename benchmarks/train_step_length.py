"""Training throughput of the demo's embedder by training document length (``train_document_max_length``).

Runs the project's own per-worker loop (:func:`distributed_ir.train.loop.train_loop`: world size 1,
no Ray) with the train section of the demo's config on its mined records, one run per length,
pinned to one core: one of the demo's 2 Ray Train workers (16 queries + 16 positives + 16 hard
negatives per step). Prints the samples/s of ``--steps`` measured steps after as many warm-up steps;
list the lengths alternated so the machine's noise falls on all of them:

    taskset -c 0 .venv/bin/python benchmarks/train_step_length.py \\
        --records outputs/scifact_minilm/train_records.jsonl --lengths 256,192,256,192
"""

from __future__ import annotations

import argparse
import tempfile

from distributed_ir.config import PipelineConfig
from distributed_ir.config_loader import load_config, to_dict
from distributed_ir.train.loop import train_loop


def samples_per_s(config: str, records: str, length: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"train.train_path={records}", f"train.output_dir={out}", f"train.max_steps={2 * steps}",
                     f"train.log_every={steps}", "train.checkpoint_every=0", "train.scaling.num_workers=1",
                     "train.scaling.cpus_per_worker=1", "train.scaling.torch_threads=1",
                     f"train.train_document_max_length={length}"]
        cfg = load_config(PipelineConfig, config, overrides).train
        return float(train_loop(to_dict(cfg))["samples_per_s"])  # the last window: the measured steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/scifact_minilm.yaml")
    ap.add_argument("--records", required=True, help="triplet records, e.g. a demo's train_records.jsonl")
    ap.add_argument("--lengths", default="256,192,256,192", help="training document lengths, in run order")
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after as many warm-up steps)")
    args = ap.parse_args()
    rows = [(n, samples_per_s(args.config, args.records, n, args.steps)) for n in map(int, args.lengths.split(","))]
    print("\n| training document tokens | samples/s | s/step (16 queries) |\n|---|---|---|")
    for n, sps in rows:
        print(f"| {n} | {sps:.2f} | {16 / sps:.2f} |")


if __name__ == "__main__":
    main()
