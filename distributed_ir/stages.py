"""The pipeline's stages as plain functions, each returning a small result that the next stage takes.

    encoder_folder   model config -> the folder the encode actors load (a Ray task saves it if needed)
    corpus_stage     corpus                -> CorpusStage   (validated, sharded into an index folder's stage/:
                                                             the text source of BM25, mining and reranking)
    dataset_stage    BEIR folder           -> splits + CorpusStage (queries and qrels read here, the corpus
                                                             staged on Ray, qrels doc ids checked there)
    index_stage      model folder + corpus -> CorpusIndex   (Ray Data encode actors, FAISS in Ray tasks)
    eval_stage       CorpusIndex + split   -> EvalResult    (queries encoded and searched on Ray actors)
    mine_stage       CorpusIndex + split   -> MineResult    (the same search, ranks cut by mine_negatives)
    train_stage      records               -> TrainResult   (Ray Train; the records are handed on, not re-read)

Every corpus pass and every query pass runs on the retrieval core (:mod:`distributed_ir.index.retrieve`):
the driver orchestrates, builds no model and holds no vector. Nor does it hold the corpus texts:
they are read from the staged corpus on Ray (:mod:`distributed_ir.index.texts`), and the driver
receives only the texts of the training records it hands on. Benchmarks call these stages too,
so they measure exactly what the pipeline runs.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from distributed_ir.config import EvalConfig, InputConfig, ModelConfig, TrainConfig
from distributed_ir.data.beir import BeirDataset, load_beir_splits
from distributed_ir.data.intake import InputCheck
from distributed_ir.data.records import TrainRecord, write_records
from distributed_ir.eval.metrics import DEFAULT_METRICS, Run, evaluate
from distributed_ir.index.pipeline import IndexOptions, stage_index_corpus
from distributed_ir.index.retrieve import CorpusIndex, index_corpus, search_queries
from distributed_ir.index.texts import STAGE, StagedCorpus, check_qrels_staged
from distributed_ir.mining import mine_from_index
from distributed_ir.models.embedder import resolve_model_path
from distributed_ir.train.launch import TrainResult, init_ray, run_training


@dataclass(frozen=True)
class CorpusStage:
    """A corpus validated and sharded once into the index folder ``path`` (``path/stage``), before
    any model encodes it: the index stage building ``path`` takes it over."""

    path: str
    num_docs: int

    @property
    def texts(self) -> StagedCorpus:
        """The staged corpus as a text source read on Ray."""
        return StagedCorpus(self.path)


@dataclass(frozen=True)
class EvalResult:
    """One model's evaluation: its metrics row, its run (top_k per query) and its corpus index."""

    name: str
    row: dict[str, Any]
    run: Run
    index: CorpusIndex


@dataclass(frozen=True)
class MineResult:
    """Records mined from an index (written to ``path``) and the miner's counts."""

    records: list[TrainRecord]
    counts: dict[str, Any]
    path: Path


def precision(ev: EvalConfig) -> str:
    """The pipeline's encode precision: bf16 autocast or fp32, as ``eval.bf16`` says (never ``auto``:
    the base and fine-tuned rows must be encoded alike)."""
    return "bf16" if ev.bf16 else "fp32"


def encoder_folder(model: ModelConfig, out: Path) -> str:
    """The folder the encode actors load for ``model``.

    A config that only names a folder gets that folder. A config that also sets embedder settings
    (max lengths, pooling, instructions) gets a self-describing copy at ``out`` (settings saved
    beside the weights), built and saved by a Ray task: the driver builds no model, and every
    actor encodes with exactly those settings.
    """
    path = resolve_model_path(model.name_or_path)
    settings = {k: v for k, v in asdict(model).items()
                if k not in ("name_or_path", "trust_remote_code") and v is not None}
    if model.trust_remote_code:
        settings["trust_remote_code"] = True
    if not settings:
        return path
    import ray

    init_ray()
    shutil.rmtree(out, ignore_errors=True)
    ray.get(ray.remote(num_cpus=0.5)(_save_embedder).remote(model, str(out)))
    return str(out)


def _save_embedder(model: ModelConfig, out: str) -> None:
    from distributed_ir.models.embedder import Embedder

    Embedder.from_config(model).save(out)


def corpus_stage(corpus: Path, out: Path, ev: EvalConfig, check: InputConfig,
                 staged_by: CorpusIndex | CorpusStage | None = None, into: InputCheck | None = None) -> CorpusStage:
    """A fresh index folder ``out`` holding only the staged corpus (validated and sharded as
    :func:`index_stage` would stage it, so its encode reuses it). ``staged_by``: an index folder of
    this run over the same corpus, whose staged corpus is taken over instead of reading and
    checking the corpus again. ``into``: the run's own check, which also gets the corpus's counts
    and reject entries. Starts (or joins) Ray: whatever reads the staged corpus runs there."""
    init_ray()
    shutil.rmtree(out, ignore_errors=True)
    if staged_by is not None:  # staging reuses shards whose stage id (files, shard count, policy) matches
        shutil.copytree(Path(staged_by.path) / STAGE, out / STAGE)
    staged, _, counted = stage_index_corpus(IndexOptions(corpus=str(corpus), out=str(out), num_shards=ev.num_shards,
                                                         on_error=check.on_error, rejects_path=check.rejects_path,
                                                         max_text_bytes=check.max_text_bytes), relay=into)
    if into is not None:
        for path, counts in counted.counts.items():
            into.add(path, counts)
    return CorpusStage(path=str(out), num_docs=sum(s.count for s in staged))


def dataset_stage(folder: Path, splits: list[str], out: Path, ev: EvalConfig, inp: InputConfig,
                  check: InputCheck) -> tuple[list[BeirDataset], CorpusStage]:
    """The BEIR splits of ``folder`` with their corpus staged into the index folder ``out``
    (:func:`corpus_stage`). This process reads the queries and qrels only (their errors come before
    Ray starts); the corpus is read by the staging tasks, and the qrels' document ids are then
    checked on the staged shards (:func:`~distributed_ir.index.texts.check_qrels_staged`). ``check``
    gets the counts and the rejects file the entries of a read of corpus, queries and qrels in that
    order: the errors, rejects and counts of ``load_beir_splits(folder, splits, check=check)``."""
    corpus = folder / "corpus.jsonl"
    check.add(corpus, {})  # counted first (the rejects file's order), where staging reads it
    check.hold()
    try:
        datasets = load_beir_splits(folder, splits, check=check, corpus=False)
        staged = corpus_stage(corpus, out, ev, inp, into=check)
        check_qrels_staged(datasets, staged.texts, check)
    finally:
        check.release()
    return datasets, staged


def index_stage(model_dir: str, corpus: Path, out: Path, ev: EvalConfig, check: InputConfig,
                staged_by: CorpusIndex | CorpusStage | None = None) -> CorpusIndex:
    """Encode the corpus with ``model_dir`` into the run-local index folder ``out`` (a fresh one:
    another model's index there is replaced). ``staged_by``: an index folder of this run over the
    same corpus, whose staged corpus is taken over (``out`` itself: a :func:`corpus_stage` made
    for this index)."""
    if staged_by is None or Path(staged_by.path).resolve() != Path(out).resolve():
        corpus_stage(corpus, out, ev, check, staged_by)
    init_ray()
    return index_corpus(model_dir, str(corpus), str(out), ev.batch_size, precision(ev), ev.num_shards, ev.actors,
                        ev.use_gpu, factory=ev.index_type, on_error=check.on_error, rejects_path=check.rejects_path,
                        max_text_bytes=check.max_text_bytes, index_shards=ev.index_shards)


def eval_queries(ds: BeirDataset, max_queries: int) -> dict[str, str]:
    """The split's queries the evaluation uses (the first ``max_queries``; 0 = all)."""
    queries = ds.split_queries()
    return dict(list(queries.items())[:max_queries]) if max_queries else queries


def eval_stage(name: str, index: CorpusIndex, ds: BeirDataset, ev: EvalConfig) -> EvalResult:
    """Search the split's queries on ``index`` (Ray Data actors) and compute the metrics row."""
    run = search_queries(index.path, eval_queries(ds, ev.max_queries), ev.top_k, ev.batch_size, precision(ev),
                         ev.actors, ev.use_gpu, searchers=ev.searchers)
    row = evaluate(run, ds.qrels, DEFAULT_METRICS)
    row["encode_docs_per_s"] = index.docs_per_s
    return EvalResult(name=name, row=row, run=run, index=index)


def mine_stage(index: CorpusIndex, ds: BeirDataset, rank_start: int, rank_end: int, per_query: int, seed: int,
               ev: EvalConfig, path: Path) -> MineResult:
    """Hard negatives from ranks ``[rank_start, rank_end)`` of ``index`` for the split's queries,
    written to ``path``."""
    records, counts = mine_from_index(index.path, ds, rank_start, rank_end, per_query, seed, ev.batch_size,
                                      precision(ev), ev.actors, ev.use_gpu, searchers=ev.searchers)
    write_records(path, records)
    return MineResult(records=records, counts=counts, path=path)


def handed_on(records: list[TrainRecord]) -> tuple[str, list[TrainRecord]]:
    """``(format, records)`` for :func:`run_training`: records this run made, with the format
    :func:`write_records` gave their file (triplet when any record has negatives)."""
    return ("triplet" if any(r.negative for r in records) else "pair"), records


def train_stage(cfg: TrainConfig, records: list[TrainRecord], path: Path, out: Path) -> TrainResult:
    """Train on records this run made (already written to ``path``): handed to Ray Train as they are."""
    return run_training(replace(cfg, train_path=str(path), output_dir=str(out)), records=handed_on(records))
