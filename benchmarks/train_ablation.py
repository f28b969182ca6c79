"""Training ablations on SciFact, side by side: the same mined records, seed and schedule, one
change per variant (any TrainConfig keys), each model evaluated on SciFact test.

Mines hard negatives once with the base model (ranks and counts from the config's ``mining``),
then trains every variant on Ray Train and prints nDCG@10 / recall@100 and training time, plus
how many in-batch false negatives (a batch document that is a positive of another query in the
global batch) the schedule meets.

    python benchmarks/train_ablation.py --config jobs/configs/scifact_minilm.yaml \\
        --variant masked:loss.mask_shared_positives=true --variant unmasked:loss.mask_shared_positives=false

A larger batch via cached in-batch negatives (GradCache: same gradients as the big batch,
activations of ``grad_cache_chunk`` texts at a time; ``benchmarks/grad_cache.py`` measures memory):

    python benchmarks/train_ablation.py --config jobs/configs/scifact_minilm.yaml \\
        --variant b16:batch_size=16 --variant b64_cached:batch_size=64,grad_cache_chunk=16
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from distributed_ir.config import PipelineConfig
from distributed_ir.config_loader import load_config
from distributed_ir.data.beir import load_beir, resolve_data_dir
from distributed_ir.data.records import read_records
from distributed_ir.stages import encoder_folder, eval_stage, index_stage, mine_stage
from distributed_ir.train.batching import epoch_batches
from distributed_ir.train.launch import run_training


def false_negative_pairs(records: list, cfg) -> tuple[int, int]:
    """(pairs, global batches): (row i, column j != i's label) with column j's document among query
    i's positives, over every global batch of the schedule (world-size independent)."""
    global_batch = cfg.batch_size * cfg.scaling.max_workers  # = the global micro-batch, fixed or elastic
    pairs = batches = 0
    for epoch in range(cfg.epochs):
        for b in epoch_batches(records, epoch, 0, 1, global_batch, cfg.num_negatives, cfg.seed):
            batches += 1
            for i, keys in enumerate(b.positive_keys):
                pairs += sum(1 for j, k in enumerate(b.doc_keys) if j != i and k in keys)
    return pairs, batches


def setup(config: str, out_dir: str):
    """The pipeline config, the output folder (created) and its train / eval splits."""
    cfg = load_config(PipelineConfig, config)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(resolve_data_dir(cfg.data_dir)) / cfg.dataset
    train_ds = load_beir(folder, cfg.train_split)
    return cfg, out, train_ds, load_beir(folder, cfg.eval_split, base=train_ds)


def corpus_file(cfg: PipelineConfig) -> Path:
    return Path(resolve_data_dir(cfg.data_dir)) / cfg.dataset / "corpus.jsonl"


def mine_once(cfg: PipelineConfig, train_ds, train_path: Path) -> Path:
    """Hard negatives of the config's ``mining`` ranks from the base model, written once to
    ``train_path`` and reused by every variant (and by ``engine_compare.py``): the pipeline's own
    index and mine stages (Ray Data actors)."""
    if not train_path.is_file():
        ev, m, out = cfg.eval, cfg.mining, train_path.parent
        index = index_stage(encoder_folder(cfg.train.model, out / "base_model"), corpus_file(cfg), out / "index_base",
                            ev, cfg.input)
        mined = mine_stage(index, train_ds, m.rank_start, m.rank_end, m.per_query, cfg.train.seed, ev, train_path)
        print(f"mined: {mined.counts}", flush=True)
    return train_path


def evaluate_checkpoint(cfg: PipelineConfig, model_path: Path, eval_ds) -> dict:
    """The pipeline's fine-tuned eval of ``model_path`` (its corpus index goes beside the model)."""
    index = index_stage(str(model_path), corpus_file(cfg), Path(model_path).parent / "index", cfg.eval, cfg.input)
    return eval_stage("finetuned", index, eval_ds, cfg.eval).row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/scifact_minilm.yaml")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME:key=value[,key=value]",
                    help="train.* overrides of one variant (repeat for each)")
    ap.add_argument("--out", default="outputs/train_ablation")
    args = ap.parse_args()
    cfg, out, train_ds, eval_ds = setup(args.config, args.out)

    train_path = mine_once(cfg, train_ds, out / "train_records.jsonl")
    _, records = read_records(train_path)

    rows = []
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        overrides = [f"train.{kv}" for kv in sets.split(",") if kv]
        tcfg = load_config(PipelineConfig, args.config, overrides).train
        tcfg = replace(tcfg, train_path=str(train_path), output_dir=str(out / name), checkpoint_every=0)
        pairs, batches = false_negative_pairs(records, tcfg)
        t0 = time.perf_counter()
        result = run_training(tcfg)
        metrics = evaluate_checkpoint(cfg, result.model_path, eval_ds)
        rows.append({"variant": name, "overrides": overrides, "ndcg@10": metrics["ndcg@10"],
                     "recall@100": metrics["recall@100"], "train_s": result.seconds,
                     "false_negative_pairs": pairs, "global_batches": batches, "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'variant':<16}{'nDCG@10':>9}{'R@100':>8}{'train s':>9}{'FN pairs / batch':>18}  overrides")
    for r in rows:
        print(f"{r['variant']:<16}{r['ndcg@10']:>9.4f}{r['recall@100']:>8.4f}{r['train_s']:>9.0f}"
              f"{r['false_negative_pairs'] / r['global_batches']:>18.2f}  {' '.join(r['overrides'])}")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
