"""The whole retrieval pipeline on a BEIR dataset: (mine -> distill) -> train -> encode -> search -> evaluate
(-> mine with the fine-tuned model -> train a reranker -> rerank -> fuse), a chain of the stages
in :mod:`distributed_ir.stages`: every corpus and query pass runs on Ray actors (the retrieval
core); this process orchestrates and holds no model and no vector.

With ``distill.enabled`` the stage in :mod:`distributed_ir.pipeline_distill` scores the mined records
with a teacher reranker before training (``OUT/distill_records.jsonl``, ``report["distill"]``).

Writes ``OUT/metrics.json`` (rows ``base`` and ``finetuned`` plus training facts),
``OUT/run.trec`` (the fine-tuned model's run), ``OUT/train/model`` (the checkpoint) and
``OUT/report.md`` with its plots (training curves, metrics bar chart), and the corpus indexes
``OUT/index_base`` and ``OUT/index_finetuned`` (``distributed-ir index``'s layout).  With
``reranker.enabled`` the stage in :mod:`distributed_ir.pipeline_rerank` adds rows ``reranked``
(and ``fused``), ``OUT/reranker/model``, ``OUT/run_reranked.trec`` (``OUT/run_fused.trec``)
and the reranker's training curves.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed_ir.config import PipelineConfig
from distributed_ir.config_loader import ConfigError, to_dict
from distributed_ir.data.beir import BeirDataset, ensure_beir, resolve_data_dir
from distributed_ir.data.records import write_records
from distributed_ir.eval.metrics import DEFAULT_METRICS, write_run
from distributed_ir.index.retrieve import CorpusIndex
from distributed_ir.mining import pairs_from_qrels
from distributed_ir.redaction import redact
from distributed_ir.stages import (
    CorpusStage,
    dataset_stage,
    encoder_folder,
    eval_stage,
    index_stage,
    mine_stage,
    train_stage,
)
from distributed_ir.train.launch import TrainResult, run_training

BASE_MODEL = "base_model"  # the base model with the config's settings saved beside it (when it sets any)
BASE_INDEX = "index_base"  # corpus indexes (distributed-ir index layout: `distributed-ir search` reads them)
FINETUNED_INDEX = "index_finetuned"


def metrics_table(rows: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of metric rows (for logs and the terminal)."""
    cols = list(DEFAULT_METRICS) + ["num_queries"]
    lines = [f"{'model':<12}" + "".join(f"{c:>12}" for c in cols)]
    for name, row in rows.items():
        cells = "".join(f"{row[c]:>12.4f}" if isinstance(row[c], float) else f"{row[c]:>12}" for c in cols)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the chain of stages (see :mod:`distributed_ir.stages`); return the report (``metrics.json``)."""
    if cfg.train.train_path and cfg.mining.enabled:
        raise ConfigError("train.train_path (prepared records) and mining.enabled are exclusive: pick one")
    if cfg.distill.enabled:  # a teacher that is not a reranker fails before any stage runs
        from distributed_ir.pipeline_distill import check_teacher

        check_teacher(cfg.distill.teacher)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folder = ensure_beir(resolve_data_dir(cfg.data_dir), cfg.dataset)
    check = cfg.input.check(out)
    ev = cfg.eval
    corpus = folder / "corpus.jsonl"
    with_base = not cfg.skip_base_eval or cfg.mining.enabled
    # this process reads no corpus row: it is staged once on Ray (read there by every later stage)
    # and the qrels' document ids are checked against the staged shards before any stage uses them
    (train_ds, eval_ds), staged = dataset_stage(folder, [cfg.train_split, cfg.eval_split],
                                                out / (BASE_INDEX if with_base else FINETUNED_INDEX), ev, cfg.input,
                                                check)
    print(check.summary_line(), flush=True)
    rows: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"config": redact(to_dict(cfg)), "input": check.summary()}

    # ---- BM25 alone (no model): the sparse first stage the hybrid row fuses with
    bm25_run = None
    if cfg.hybrid.enabled:
        from distributed_ir.pipeline_hybrid import bm25_row

        rows["bm25"], bm25_run = bm25_row(cfg.hybrid, eval_ds, staged, ev.top_k, ev.max_queries, out, report)
        print(metrics_table(rows), flush=True)

    # ---- base model: one corpus index (Ray Data actors), evaluated and mined
    base = base_index = None
    if with_base:
        model_dir = encoder_folder(cfg.train.model, out / BASE_MODEL)
        print(f"[pipeline] encoding {staged.num_docs} documents with the base model on Ray Data actors", flush=True)
        base_index = index_stage(model_dir, corpus, out / BASE_INDEX, ev, cfg.input, staged)
        if not cfg.skip_base_eval:
            base = eval_stage("base", base_index, eval_ds, ev)
            rows["base"] = base.row
            print(metrics_table(rows), flush=True)
    result = train_embedder(cfg, out, train_ds, base_index, staged, report)

    # ---- fine-tuned model: encode, search, evaluate (the checkpoint carries its own settings)
    tuned_index = index_stage(str(result.model_path), corpus, out / FINETUNED_INDEX, ev, cfg.input,
                              base_index or staged)
    tuned = eval_stage("finetuned", tuned_index, eval_ds, ev)
    rows["finetuned"] = tuned.row
    write_run(out / "run.trec", tuned.run)
    if base is not None:
        write_run(out / "run_base.trec", base.run)
    first_stage = tuned.run
    if bm25_run is not None:
        from distributed_ir.pipeline_hybrid import hybrid_row

        rows["hybrid"], hybrid = hybrid_row(cfg.hybrid, tuned.run, bm25_run, eval_ds, ev.top_k, out, report)
        first_stage = hybrid if cfg.hybrid.rerank else tuned.run
    report["metrics"] = rows
    report["model_path"] = str(result.model_path)
    (out / "metrics.json").write_text(json.dumps(report, indent=2))  # the embedder's results survive a later failure
    print(metrics_table(rows), flush=True)

    # ---- reranker: mine with the fine-tuned model, train on Ray Train, rerank with Ray Data
    reranker_history: list[dict[str, Any]] = []
    if cfg.reranker.enabled:
        from distributed_ir.pipeline_rerank import run_reranker_stage

        reranker_history = run_reranker_stage(cfg, out, train_ds, eval_ds, tuned.index, first_stage,
                                              result.model_path, report, rows)
        print(metrics_table(rows), flush=True)
    finish(out, report, result.history, reranker_history)
    return report


def train_embedder(cfg: PipelineConfig, out: Path, train_ds: BeirDataset, base_index: CorpusIndex | None,
                   staged: CorpusStage, report: dict[str, Any]) -> TrainResult:
    """The training records (prepared, mined with the base model, or qrels pairs; scored by the
    distillation teacher when ``distill`` is on), then Ray Train; fills ``report`` (``mining``,
    ``train_input``, ``distill``, ``train``)."""
    train_path = out / "train_records.jsonl"
    if cfg.train.train_path and not cfg.distill.enabled:  # prepared records, read and checked by run_training
        train_path = Path(cfg.train.train_path).resolve()
        print(f"[pipeline] training on prepared records {train_path}", flush=True)
        result = run_training(replace(cfg.train, train_path=str(train_path), output_dir=str(out / "train")))
    else:
        if cfg.train.train_path:  # prepared records the teacher scores: read and checked here
            from distributed_ir.pipeline_distill import prepared_records

            records, report["train_input"] = prepared_records(cfg.train, out / "train")
        elif cfg.mining.enabled:
            m = cfg.mining
            mined = mine_stage(base_index, train_ds, m.rank_start, m.rank_end, m.per_query, cfg.train.seed,
                               cfg.eval, train_path)
            records = mined.records
            report["mining"] = mined.counts
            print(f"[pipeline] mined hard negatives: {mined.counts}", flush=True)
        else:
            records = pairs_from_qrels(train_ds, staged.texts)
            write_records(train_path, records)
        if cfg.distill.enabled:  # the teacher's scores on every record's positives + negatives (Ray Data)
            from distributed_ir.pipeline_distill import distill_stage

            records, train_path = distill_stage(cfg.distill, records, out, report)
        result = train_stage(cfg.train, records, train_path, out / "train")
    report["train"] = {"seconds": round(result.seconds, 1), "records": result.input["accepted"], **{
        k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
    print(f"[pipeline] training took {result.seconds:.0f}s; model at {result.model_path}", flush=True)
    return result


def finish(out: Path, report: dict[str, Any], history: list[dict[str, Any]],
           reranker_history: list[dict[str, Any]]) -> None:
    """The final ``metrics.json`` and ``report.md`` (a report that fails to render never fails the run)."""
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"[pipeline] wrote {out / 'metrics.json'} and {out / 'run.trec'}", flush=True)
    try:  # the report is a convenience: a finished run never fails over it
        from distributed_ir.report import write_report

        print(f"[pipeline] wrote {write_report(out, report, history, reranker_history)}", flush=True)
    except Exception as e:
        print(f"[pipeline] report.md skipped: {e!r}", flush=True)
