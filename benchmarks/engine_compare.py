"""DDP vs DeepSpeed ZeRO-2 (and more) on the same SciFact fine-tune of all-MiniLM-L6-v2, side by side.

Mines hard negatives once with the base model (ranks 10-100, as the demo does), then trains the
same config with each engine on Ray Train and evaluates each model on SciFact test.  Prints
nDCG@10, training seconds and the median training samples/s of the logged windows.

    python benchmarks/engine_compare.py --config jobs/configs/scifact_minilm.yaml --epochs 1 \
        --engines ddp deepspeed:2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from train_ablation import evaluate_checkpoint, mine_once, setup

from distributed_ir.config import EngineConfig
from distributed_ir.train.launch import run_training


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/scifact_minilm.yaml")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--engines", nargs="+", default=["ddp", "deepspeed:2"], help="ddp | deepspeed:<zero stage>")
    ap.add_argument("--out", default="outputs/engine_compare")
    ap.add_argument("--speed-only", type=int, default=0, metavar="STEPS",
                    help="only time STEPS optimizer steps per engine, alternating engines --repeats times (no eval)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg, out, train_ds, eval_ds = setup(args.config, args.out)

    train_path = mine_once(cfg, train_ds, out / "train_records.jsonl")  # mine once, reuse for every engine

    if args.speed_only:
        return speed_only(cfg, train_path, out, args)
    rows = []
    for spec in args.engines:
        name, _, stage = spec.partition(":")
        engine = EngineConfig(name=name, zero_stage=int(stage or 2))
        tcfg = replace(cfg.train, train_path=str(train_path), output_dir=str(out / spec.replace(":", "-zero")),
                       epochs=args.epochs, engine=engine, checkpoint_every=0)
        t0 = time.perf_counter()
        result = run_training(tcfg)
        history = json.loads((Path(tcfg.output_dir) / "final_checkpoint" / "history.json").read_text())
        rates = [m["samples_per_s"] for m in history[1:]] or [history[-1]["samples_per_s"]]
        metrics = evaluate_checkpoint(cfg, result.model_path, eval_ds)
        rows.append({"engine": spec, "ndcg@10": metrics["ndcg@10"], "train_s": result.seconds,
                     "samples_per_s": statistics.median(rates), "state_mb": history[-1]["state_mb"],
                     "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    ref = rows[0]
    print(f"\n{'engine':<14}{'nDCG@10':>9}{'train s':>9}{'samples/s':>11}{'x first':>9}{'state MB':>10}")
    for r in rows:
        print(f"{r['engine']:<14}{r['ndcg@10']:>9.4f}{r['train_s']:>9.0f}{r['samples_per_s']:>11.2f}"
              f"{r['samples_per_s'] / ref['samples_per_s']:>9.2f}{r['state_mb']:>10.1f}")
    (out / "results.json").write_text(json.dumps(rows, indent=2))


def speed_only(cfg, train_path: Path, out: Path, args) -> None:
    """A-B-A-B: each engine trains STEPS steps per round; median samples/s per engine (first window dropped)."""
    rates: dict[str, list[float]] = {spec: [] for spec in args.engines}
    for round_ in range(args.repeats):
        for spec in args.engines:
            name, _, stage = spec.partition(":")
            tcfg = replace(cfg.train, train_path=str(train_path), max_steps=args.speed_only, log_every=2,
                           output_dir=str(out / f"speed-{spec.replace(':', '-zero')}-{round_}"),
                           engine=EngineConfig(name=name, zero_stage=int(stage or 2)), checkpoint_every=0)
            run_training(tcfg)
            history = json.loads((Path(tcfg.output_dir) / "final_checkpoint" / "history.json").read_text())
            rates[spec] += [m["samples_per_s"] for m in history[1:]]
            print(spec, round_, [round(m["samples_per_s"], 2) for m in history], flush=True)
    ref = statistics.median(rates[args.engines[0]])
    print(f"\n{'engine':<14}{'median samples/s':>18}{'windows':>9}{'x first':>9}")
    for spec, r in rates.items():
        print(f"{spec:<14}{statistics.median(r):>18.2f}{len(r):>9}{statistics.median(r) / ref:>9.2f}")


if __name__ == "__main__":
    main()
