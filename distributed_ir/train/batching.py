"""Deterministic per-worker batches of training records.

Each epoch the records are permuted with ``seed + epoch``; global step s takes records
``perm[s*W*B : (s+1)*W*B]`` and rank r takes the r-th slice of B.  So 2 workers x B see exactly
the records 1 worker x 2B sees, the data order does not depend on the world size, and a resumed
run can skip to (epoch, step) without replaying anything.  The last incomplete global batch is
dropped (every rank must gather equal shapes); a different tail is dropped each epoch.
Positive/negative choice is seeded by (seed, epoch, record index), also world-size independent.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_ir.data.records import ScoredRecord, TrainRecord


@dataclass
class TextBatch:
    """Texts for one micro-step on one worker; ``negatives`` is query-major, k per query."""

    queries: list[str]
    positives: list[str]
    negatives: list[str]
    labels: list[float] | None = None  # scored pairs: positives hold the documents
    # text keys (see text_key) of positives + negatives, and of every positive of each query:
    # in-batch losses mask a column that is a positive of the row's query (false negative)
    doc_keys: list[int] | None = None
    positive_keys: list[list[int]] | None = None
    # a teacher's scores of each query's own candidates [B][1 + k]: its positive, then its k
    # negatives; None unless every record of the batch carries scores
    teacher_scores: list[list[float]] | None = None

    def key_tensors(self) -> dict[str, Any]:
        """``doc_keys`` [B(1+k)] and ``positive_keys`` [B, P] (padded by repeating the first key)
        as int64 tensors, for the losses' false-negative mask; empty for scored batches."""
        if self.doc_keys is None or self.positive_keys is None:
            return {}
        width = max(len(k) for k in self.positive_keys)
        padded = [k + [k[0]] * (width - len(k)) for k in self.positive_keys]
        return {"doc_keys": torch.tensor(self.doc_keys, dtype=torch.int64),
                "positive_keys": torch.tensor(padded, dtype=torch.int64)}


def text_key(text: str) -> int:
    """A stable signed 64-bit key of ``text`` (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def steps_per_epoch(num_records: int, world_size: int, batch_size: int) -> int:
    return num_records // (world_size * batch_size)


def epoch_batches(
    records: list[TrainRecord] | list[ScoredRecord],
    epoch: int,
    rank: int,
    world_size: int,
    batch_size: int,
    num_negatives: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[TextBatch]:
    """Yield this rank's micro-batches of ``epoch``, starting at global micro-step ``start_step``."""
    perm = np.random.default_rng(seed + epoch).permutation(len(records))
    n_steps = steps_per_epoch(len(records), world_size, batch_size)
    neg_pool = _negative_pool(records) if num_negatives else []
    for step in range(start_step, n_steps):
        lo = step * world_size * batch_size + rank * batch_size
        idx = perm[lo : lo + batch_size]
        yield _make_batch(records, idx, epoch, num_negatives, seed, neg_pool)


def _negative_pool(records: list) -> list[str]:
    pool: list[str] = []
    for rec in records:
        if isinstance(rec, TrainRecord):
            pool.extend(rec.negative or rec.positive[:1])
    return pool


def _make_batch(records: list, idx: np.ndarray, epoch: int, k: int, seed: int, neg_pool: list[str]) -> TextBatch:
    first = records[int(idx[0])]
    if isinstance(first, ScoredRecord):
        rows = [records[int(i)] for i in idx]
        return TextBatch([r.query for r in rows], [r.document for r in rows], [], [r.label for r in rows])
    queries, positives, negatives, positive_keys, teacher = [], [], [], [], []
    for i in idx:
        rec: TrainRecord = records[int(i)]
        rng = random.Random(f"{seed}:{epoch}:{int(i)}")
        queries.append(rec.query)
        positive_keys.append([text_key(p) for p in rec.positive])
        # draw indices (the same draws as drawing the texts) so teacher scores follow the documents
        pos = rng.choice(range(len(rec.positive)))
        positives.append(rec.positive[pos])
        negs: list[int] = []
        if k:
            if len(rec.negative) >= k:
                negs = rng.sample(range(len(rec.negative)), k)
            elif rec.negative:  # fewer than k mined: sample with replacement
                negs = rng.choices(range(len(rec.negative)), k=k)
            else:  # no mined negatives: random documents from the pool, never a positive
                picks = [d for d in rng.sample(neg_pool, min(len(neg_pool), 4 * k + 4)) if d not in rec.positive]
                negatives.extend((picks * k)[:k] if picks else rng.choices(neg_pool, k=k))
        negatives.extend(rec.negative[j] for j in negs)
        if rec.scores is not None and (negs or not k):
            teacher.append([rec.scores[pos]] + [rec.scores[len(rec.positive) + j] for j in negs])
    return TextBatch(queries, positives, negatives, doc_keys=[text_key(d) for d in positives + negatives],
                     positive_keys=positive_keys, teacher_scores=teacher if len(teacher) == len(queries) else None)
