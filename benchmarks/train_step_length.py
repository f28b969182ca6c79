"""Seconds per training step of the demo's embedder step, one process, by precision and document length.

The demo's per-worker shape: 16 queries (max 64 tokens) and their 16 positives + 16 hard negatives
(max ``LEN`` tokens), real SciFact training records, InfoNCE on the normalised
[CLS] states (the cost is the encoder's forward and backward), AdamW. Run it pinned to one core to
see one Ray Train worker's step (the demo runs 2 workers x 1 thread):

    taskset -c 0 .venv/bin/python benchmarks/train_step_length.py outputs/scifact_minilm/train_records.jsonl \\
        bf16:256 bf16:192 bf16:256 bf16:192 fp32:256 bf16:128

Each ``PRECISION:LEN`` builds a fresh model, runs 2 warm-up steps and prints the median of 5 timed
steps; alternate the variants so the machine's noise falls on both.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(records_path: str, variants: list[str]) -> None:
    from transformers import AutoModel, AutoTokenizer

    from distributed_ir.models.embedder import resolve_model_path

    torch.set_num_threads(1)
    path = resolve_model_path("default")
    tok = AutoTokenizer.from_pretrained(path)
    recs = [json.loads(line) for line in open(records_path)]

    def batch(i: int) -> tuple[list[str], list[str]]:
        rs = recs[i * 16:(i + 1) * 16]
        return [r["query"] for r in rs], [r["positive"][0] for r in rs] + [r["negative"][0] for r in rs]

    def run(precision: str, doc_len: int, steps: int = 5, warm: int = 2) -> tuple[float, tuple]:
        torch.manual_seed(0)
        model = AutoModel.from_pretrained(path)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        times, shape = [], ()
        for i in range(warm + steps):
            q, d = batch(i)
            qe = tok(q, truncation=True, max_length=64, padding=True, return_tensors="pt")
            de = tok(d, truncation=True, max_length=doc_len, padding=True, return_tensors="pt")
            shape = tuple(de["input_ids"].shape)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                qv = model(**qe).last_hidden_state[:, 0]
                dv = model(**de).last_hidden_state[:, 0]
                norm = torch.nn.functional.normalize
                s = norm(qv.float(), dim=-1) @ norm(dv.float(), dim=-1).T / 0.05
            loss = torch.nn.functional.cross_entropy(s, torch.arange(len(q)))
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= warm:
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2], shape

    print("| precision | document tokens | document batch | median s/step |\n|---|---|---|---|")
    for v in variants:
        precision, length = v.split(":")
        t, shape = run(precision, int(length))
        print(f"| {precision} | {length} | {shape} | {t:.2f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
