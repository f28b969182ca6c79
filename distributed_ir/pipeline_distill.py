"""The pipeline's distillation stage: mined (or prepared) records -> a teacher reranker scores every
record's positives and negatives on a Ray Data actor pool -> records with ``scores`` -> training.

One pass over the unique (query, text) pairs of all records (:func:`~distributed_ir.eval.rerank.rerank_with_ray`,
pairs sorted by text length so each block pads little); the driver builds no model.  The scores are
attached to each record in ``positive + negative`` order (the records format's ``scores``), written
to ``OUT/distill_records.jsonl`` and handed to training as they are.  Records that already hold
scores keep them unless ``distill.rescore``; records without negatives are dropped (distillation
ranks a query's positive against its negatives, and training refuses them).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed_ir.config import DistillConfig, TrainConfig
from distributed_ir.config_loader import ConfigError
from distributed_ir.data.records import TrainRecord, read_records, write_records

DISTILL_RECORDS = "distill_records.jsonl"


def check_teacher(path: str) -> str:
    """``path`` resolved, if it is a saved reranker folder; else a ConfigError naming ``distill.teacher``.
    Reads the folder's settings file only: no model is built here."""
    from distributed_ir.models.reranker_base import read_settings
    from distributed_ir.models.rerankers import RERANKER_CLASSES

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"distill.teacher={path!r} is not a local folder: pass a saved reranker folder (what "
                          "`distributed-ir rerank --model` loads)", key="distill.teacher")
    try:
        saved = read_settings(folder)
    except ValueError as e:  # a settings file without a reranker section: an embedder
        raise ConfigError(f"distill.teacher={path!r}: {e}", key="distill.teacher") from None
    if saved is None or saved[0] not in RERANKER_CLASSES:
        raise ConfigError(f"distill.teacher={path!r} is not a saved reranker (its settings file names no "
                          f"{' | '.join(RERANKER_CLASSES)}): save one with `distributed-ir train reranker`",
                          key="distill.teacher")
    return str(folder.resolve())


def prepared_records(cfg: TrainConfig, out: Path) -> tuple[list[TrainRecord], dict[str, Any]]:
    """The user's ``train.train_path`` records, read and checked as training would (``cfg.input``),
    and the input counts."""
    check = cfg.input.check(out)
    fmt, records = read_records(cfg.train_path, check=check)
    print(check.summary_line(), flush=True)
    if fmt == "scored":
        raise ConfigError(f"train.train_path={cfg.train_path!r} holds scored pairs; distillation needs triplet "
                          "records (query, positive, negative)", key="train.train_path")
    return records, check.summary()


def teacher_pairs(records: list[TrainRecord], rescore: bool) -> tuple[dict[str, list[str]], list[list[int] | None]]:
    """The unique (query, text) pairs to score, longest text first, and for each record the pair row
    of each of its ``positive + negative`` texts (None: the record keeps its own scores)."""
    todo = [rec.scores is None or rescore for rec in records]
    keys = {(rec.query, text) for rec, go in zip(records, todo) if go for text in rec.positive + rec.negative}
    ordered = sorted(keys, key=lambda k: (-len(k[1]), k[1], -len(k[0]), k[0]))
    row = {k: i for i, k in enumerate(ordered)}
    slots = [[row[(rec.query, t)] for t in rec.positive + rec.negative] if go else None
             for rec, go in zip(records, todo)]
    pairs = {"query_id": [str(i) for i in range(len(ordered))], "query": [q for q, _ in ordered],
             "document": [d for _, d in ordered]}
    return pairs, slots


def distill_stage(cfg: DistillConfig, records: list[TrainRecord], out: Path,
                  report: dict[str, Any]) -> tuple[list[TrainRecord], Path]:
    """Score ``records`` with ``cfg.teacher`` on Ray Data; returns the scored records and the file
    they were written to (``OUT/distill_records.jsonl``); fills ``report["distill"]``."""
    from distributed_ir.eval.rerank import rerank_with_ray
    from distributed_ir.models.precision import PrecisionPolicy
    from distributed_ir.train.launch import init_ray

    teacher = check_teacher(cfg.teacher)
    kept = [rec for rec in records if rec.negative]
    if not kept:
        raise ValueError(f"distill: none of the {len(records)} training records has negatives; distillation ranks "
                         "each query's positive against its negatives (mining found none?)")
    pairs, slots = teacher_pairs(kept, cfg.rescore)
    facts: dict[str, Any] = {"pairs": 0, "seconds": 0.0, "pairs_per_s": 0.0}
    if pairs["query"]:
        print(f"[pipeline] distill: the teacher scores {len(pairs['query'])} (query, text) pairs of "
              f"{sum(s is not None for s in slots)} records on Ray Data actors", flush=True)
        init_ray()
        scores, facts = rerank_with_ray(teacher, pairs, cfg.batch_size,
                                        PrecisionPolicy(cfg.precision, min_cosine=cfg.min_cosine), cfg.actors,
                                        cfg.use_gpu)
        kept = [rec if slot is None else replace(rec, scores=[float(scores[i]) for i in slot])
                for rec, slot in zip(kept, slots)]
    path = write_records(out / DISTILL_RECORDS, kept)
    report["distill"] = {"teacher": teacher, "records": len(kept), "scored_records": sum(s is not None for s in slots),
                         "kept_scores": sum(s is None for s in slots),
                         "dropped_without_negatives": len(records) - len(kept), "path": str(path), **facts}
    print(f"[pipeline] distill: {report['distill']}", flush=True)
    return kept, path
