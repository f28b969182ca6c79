"""GradCache: activation memory and step time of one training step, uncached vs cached chunks.

One worker, the DDP engine's ``forward_backward`` (InfoNCE with hard negatives), the same batch
for every setting.  Reports the peak bytes autograd holds for backward (saved activations,
parameters excluded, each storage counted once), the median step time, and the largest gradient
difference from the uncached step (dropout off; GradCache is exact up to float rounding).

    python benchmarks/grad_cache.py --batch 64 --negatives 1 --chunks 0 32 16 8
    python benchmarks/grad_cache.py --model tiny --batch 16 --chunks 0 4 --repeats 1   # smoke run

A training run with a larger batch via caching is a ``train_ablation.py`` variant, e.g.
``--variant b32:batch_size=32 --variant b128_cached:batch_size=128,grad_cache_chunk=32``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.train.batching import TextBatch, text_key
from distributed_ir.train.engines import DDPEngine
from distributed_ir.train.tasks import get_task


class _Saved:
    """One saved tensor; its storage leaves the count when autograd drops it."""

    def __init__(self, meter: SavedActivations, ptr: int, tensor: torch.Tensor):
        self.meter, self.ptr, self.tensor = meter, ptr, tensor

    def __del__(self) -> None:
        self.meter.release(self.ptr)


class SavedActivations:
    """Live and peak bytes of tensors autograd saves for backward (``saved_tensors_hooks``)."""

    def __init__(self, params: list[torch.Tensor]):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.live: dict[int, list[int]] = {}  # storage address -> [references, bytes]
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.skip or ptr == 0:
            return t
        entry = self.live.setdefault(ptr, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        return _Saved(self, ptr, t)

    @staticmethod
    def unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, ptr: int) -> None:
        entry = self.live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[ptr]


def _batch(n: int, k: int, query_words: int, doc_words: int) -> TextBatch:
    queries = [" ".join(f"query{i} term{j}" for j in range(query_words // 2)) for i in range(n)]
    positives = [" ".join(f"document{i} word{j}" for j in range(doc_words // 2)) for i in range(n)]
    negatives = [" ".join(f"negative{i} word{j}" for j in range(doc_words // 2)) for i in range(n * k)]
    return TextBatch(queries, positives, negatives, doc_keys=[text_key(d) for d in positives + negatives],
                     positive_keys=[[text_key(p)] for p in positives])


def _tiny_model() -> str:
    from load_1m import build_model

    return str(build_model(Path(tempfile.mkdtemp(prefix="grad-cache-bench-")) / "tiny"))


def measure(model: str, chunk: int, batch: TextBatch, args: argparse.Namespace) -> dict:
    cfg = from_dict(TrainConfig, {"model": {"name_or_path": model, "query_max_length": args.query_max_length,
                                            "document_max_length": args.doc_max_length},
                                  "batch_size": len(batch.queries), "num_negatives": args.negatives,
                                  "grad_cache_chunk": chunk})
    task = get_task(cfg)
    module = task.build()
    module.eval()  # dropout off: chunked dropout draws other masks, and the gradient check is about the cache
    device = torch.device(args.device)
    engine = DDPEngine(cfg, module, task.param_groups(module), device, 1, 10)
    inputs = {k: {n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else
              v.to(device) if isinstance(v, torch.Tensor) else v for k, v in task.inputs(module, batch).items()}
    params = list(module.parameters())
    cuda = device.type == "cuda"
    times, peak, peak_gpu = [], 0, 0
    for i in range(args.repeats + args.warmup):
        meter = SavedActivations(params)
        torch.manual_seed(0)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            loss = engine.forward_backward(inputs, boundary=True)
        if cuda:
            torch.cuda.synchronize()
            peak_gpu = max(peak_gpu, torch.cuda.max_memory_allocated() - base)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        peak = max(peak, meter.peak)
        grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).cpu()
        engine.optimizer.zero_grad(set_to_none=True)
    row = {"chunk": chunk, "loss": float(loss), "saved_activation_mb": peak / 2**20,
           "step_s": statistics.median(times), "grads": grads}
    if cuda:  # above the weights (and, after the first step, the gradients) already allocated
        row["step_peak_gpu_mb"] = peak_gpu / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default' (all-MiniLM-L6-v2), 'tiny' (built here) or a path")
    ap.add_argument("--batch", type=int, default=64, help="queries per step")
    ap.add_argument("--negatives", type=int, default=1, help="hard negatives per query")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 32, 16, 8], help="0 = uncached")
    ap.add_argument("--query-max-length", type=int, default=32)
    ap.add_argument("--doc-max-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (GPU: kernels, allocator)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _tiny_model() if args.model == "tiny" else args.model
    batch = _batch(args.batch, args.negatives, args.query_max_length, args.doc_max_length)
    rows = [measure(model, c, batch, args) for c in args.chunks]
    base = rows[0]
    print(f"{'chunk':>6}{'saved act. MB':>15}{'step peak GPU MB':>18}{'step s':>9}{'x time':>8}"
          f"{'max rel dgrad':>15}  loss")
    for r in rows:
        r["max_grad_diff"] = float((r.pop("grads") - base["grads"]).abs().max() / base["grads"].abs().max()) \
            if r is not base else 0.0
        gpu = f"{r['step_peak_gpu_mb']:.1f}" if "step_peak_gpu_mb" in r else "-"
        print(f"{r['chunk'] or 'off':>6}{r['saved_activation_mb']:>15.1f}{gpu:>18}{r['step_s']:>9.3f}"
              f"{r['step_s'] / base['step_s']:>8.2f}{r['max_grad_diff']:>15.1e}  {r['loss']:.6f}")
    base.pop("grads", None)
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
