"""Ray Train (1 worker) vs a bare torch loop: samples/s of the same training step.

Variants: ``bare`` (a hand-written torch loop), ``loop`` (the project's per-worker loop called
without Ray) and ``ray`` (that loop in a 1-worker TorchTrainer). All run the same step (all-MiniLM-L6-v2, SciFact train pairs, batch 16, in-batch InfoNCE,
AdamW, bf16 autocast when --bf16) on the same cores, alternating, each in a fresh process.
Samples/s is measured over the steady-state window (after --warmup steps); the Ray side
includes the ray.train.report calls of a log interval, as a real run pays them.

    IR_DATA_DIR=../shared/data .venv/bin/python benchmarks/train_overhead.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _records(tmp: Path) -> Path:
    from distributed_ir.data.beir import load_beir
    from distributed_ir.data.records import write_records
    from distributed_ir.mining import pairs_from_qrels

    ds = load_beir(Path(os.environ["IR_DATA_DIR"]) / "scifact", "train")
    return write_records(tmp / "train.jsonl", pairs_from_qrels(ds))


def bare(args: argparse.Namespace, train_path: Path) -> float:
    """A plain torch loop: no Ray, no framework, same components."""
    from contextlib import nullcontext

    import torch

    from distributed_ir.config import ModelConfig
    from distributed_ir.data.records import read_records
    from distributed_ir.losses import InfoNCELoss
    from distributed_ir.models.embedder import Embedder
    from distributed_ir.train.batching import epoch_batches

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    _, records = read_records(train_path)
    emb = Embedder.from_config(ModelConfig(query_max_length=64, document_max_length=256))
    emb.train()
    opt = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=5e-5)
    loss_fn = InfoNCELoss(0.05)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext()
    t0 = None
    batches = epoch_batches(records, 0, 0, 1, args.batch_size, 0, seed=42)
    for step, batch in enumerate(batches, start=1):
        if step == args.warmup + 1:
            t0 = time.perf_counter()
        q = emb.tokenize(batch.queries, "query")
        d = emb.tokenize(batch.positives, "document")
        with autocast:
            qe, de = emb(**q), emb(**d)
        loss = loss_fn(qe, de)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(emb.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == args.warmup + args.steps:
            break
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def _loop_config(args: argparse.Namespace, train_path: Path, out: str):
    from distributed_ir.config import TrainConfig
    from distributed_ir.config_loader import from_dict

    # Window 1 = warmup steps, window 2 = the measured steps (log_every = steps).
    return from_dict(TrainConfig, {
        "train_path": str(train_path), "output_dir": out, "batch_size": args.batch_size,
        "max_steps": 2 * args.steps, "log_every": args.steps, "bf16": args.bf16,
        "model": {"query_max_length": 64, "document_max_length": 256},
        "optim": {"lr": 5e-5, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 1, "cpus_per_worker": args.threads, "torch_threads": args.threads},
    })


def loop(args: argparse.Namespace, train_path: Path) -> float:
    """The project's own per-worker loop, called without Ray (world size 1)."""
    from distributed_ir.config_loader import to_dict
    from distributed_ir.train.loop import train_loop

    with tempfile.TemporaryDirectory() as out:
        result = train_loop(to_dict(_loop_config(args, train_path, out)))
    return float(result["samples_per_s"])


def ray_train(args: argparse.Namespace, train_path: Path, nice0: bool = False) -> float:
    """The loop in a 1-worker TorchTrainer on a local cluster started as the CLI starts it."""
    import ray

    from distributed_ir.train.launch import init_ray, run_training

    if nice0:  # Ray starts workers at nice 15 (RAY_worker_niceness); the raylet reads this at start
        os.environ["RAY_worker_niceness"] = "0"
    if args.ray_lean:  # experiment: fewer Ray daemons/callbacks competing for the 2 cores
        os.environ.update(RAY_TRAIN_METRICS_ENABLED="0", RAY_worker_niceness="0")
        ray.init(num_cpus=args.threads, _node_ip_address="127.0.0.1", log_to_driver=False, include_dashboard=False)
    else:
        init_ray(num_cpus=args.threads)
    with tempfile.TemporaryDirectory() as out:
        result = run_training(_loop_config(args, train_path, out))
    ray.shutdown()
    return float(result.metrics["samples_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=0, help="bare-loop warmup steps (default: --steps, so "
                        "every variant times the same batches)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--kinds", default="bare,loop,ray", help="comma list of bare, loop, ray, ray_nice0")
    parser.add_argument("--ray-lean", action="store_true", help="Ray without dashboard, metrics, worker nice")
    parser.add_argument("--one", choices=["bare", "loop", "ray", "ray_nice0"], help=argparse.SUPPRESS)
    parser.add_argument("--train-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup or args.steps
    if args.one:
        fn = {"bare": bare, "loop": loop, "ray": ray_train,
              "ray_nice0": lambda a, p: ray_train(a, p, nice0=True)}[args.one]
        print(json.dumps({"samples_per_s": fn(args, Path(args.train_path))}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        train_path = _records(Path(tmp))
        kinds = args.kinds.split(",")
        results: dict[str, list[float]] = {k: [] for k in kinds}
        for run in range(args.runs):
            for kind in kinds:  # alternate so noise hits all alike
                cmd = [sys.executable, __file__, "--one", kind, "--train-path", str(train_path),
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
                if args.bf16:
                    cmd.append("--bf16")
                if args.ray_lean:
                    cmd.append("--ray-lean")
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
                if out.returncode != 0:
                    sys.exit(f"{kind} run failed:\n{out.stderr[-4000:]}")
                value = json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"]
                results[kind].append(value)
                print(f"run {run + 1} {kind:>4}: {value:.2f} samples/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print("\n| loop | runs (samples/s) | median |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {', '.join(f'{x:.2f}' for x in v)} | {med[k]:.2f} |")
    for k in kinds[1:]:
        print(f"ratio {k}/{kinds[0]} (median): {med[k] / med[kinds[0]]:.3f}")


if __name__ == "__main__":
    main()
