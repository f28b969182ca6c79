"""The pipeline's reranker stage: mine with the fine-tuned embedder -> train a reranker on Ray
Train -> rerank the fine-tuned run's top_k with Ray Data (-> fuse) -> metric rows.

Negatives come from the fine-tuned model's own index over the train-split queries: the
reranker learns to separate exactly the kind of candidates it will rerank at eval time. Document
texts come from that index's staged corpus, read on Ray (the driver holds none but the records').
Writes ``OUT/reranker_records.jsonl``, ``OUT/reranker/model`` (the reranker),
``OUT/run_reranked.trec`` and, with ``reranker.fuse``, ``OUT/run_fused.trec``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed_ir.config import PipelineConfig
from distributed_ir.data.beir import BeirDataset
from distributed_ir.eval.metrics import DEFAULT_METRICS, Run, evaluate, write_run
from distributed_ir.index.retrieve import CorpusIndex
from distributed_ir.index.texts import StagedCorpus
from distributed_ir.stages import handed_on, mine_stage

RECORDS = "reranker_records.jsonl"
RERANKED_RUN = "run_reranked.trec"
FUSED_RUN = "run_fused.trec"


def run_reranker_stage(cfg: PipelineConfig, out: Path, train_ds: BeirDataset, eval_ds: BeirDataset,
                       index: CorpusIndex, run: Run, embedder_path: Path, report: dict[str, Any],
                       rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the stage on the fine-tuned model's corpus ``index``; fills ``report`` (``reranker_mining``,
    ``reranker_train``, ``rerank``) and ``rows`` (``reranked``, ``fused``); returns the reranker's
    training history."""
    from distributed_ir.eval.rerank import rerank_run
    from distributed_ir.models.precision import PrecisionPolicy
    from distributed_ir.train.launch import init_ray, run_training

    rr, m, ev = cfg.reranker, cfg.reranker.mining, cfg.eval
    print(f"[pipeline] reranker: mining ranks {m.rank_start}..{m.rank_end} of the fine-tuned model for "
          f"{len(train_ds.split_queries())} {cfg.train_split} queries", flush=True)
    mined = mine_stage(index, train_ds, m.rank_start, m.rank_end, m.per_query, rr.train.seed, ev, out / RECORDS)
    records, records_path = mined.records, mined.path
    report["reranker_mining"] = mined.counts
    print(f"[pipeline] reranker: mined {mined.counts}", flush=True)

    model = rr.train.model
    if model.name_or_path == "finetuned":
        model = replace(model, name_or_path=str(embedder_path))
    train_cfg = replace(rr.train, model=model, train_path=str(records_path), output_dir=str(out / "reranker"))
    print(f"[pipeline] reranker: training a {train_cfg.task} from {model.name_or_path}", flush=True)
    result = run_training(train_cfg, records=handed_on(records))  # this stage's own records: not read back
    report["reranker_train"] = {"seconds": round(result.seconds, 1), "records": len(records), "task": train_cfg.task,
                                "init_from": model.name_or_path, "model_path": str(result.model_path), **{
                                    k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
    print(f"[pipeline] reranker: training took {result.seconds:.0f}s; model at {result.model_path}", flush=True)

    init_ray()  # run_training left Ray up; a no-op then, but the stage does not rely on it
    reranked, first_stage, facts = rerank_run(str(result.model_path), run, eval_ds.split_queries(),
                                              StagedCorpus(index.path), rr.top_k, rr.batch_size,
                                              PrecisionPolicy(rr.precision, min_cosine=rr.min_cosine), rr.actors,
                                              rr.train.scaling.use_gpu, compile=rr.compile)
    report["rerank"] = {"top_k": rr.top_k, **facts}
    print(f"[pipeline] reranker: reranked {facts['pairs']} pairs at {facts['pairs_per_s']} pairs/s", flush=True)
    write_run(out / RERANKED_RUN, reranked, tag="distributed-ir-rerank")
    rows["reranked"] = evaluate(reranked, eval_ds.qrels, DEFAULT_METRICS)
    if rr.fuse is not None:
        from distributed_ir.eval.fusion import fuse_runs

        fused = fuse_runs(first_stage, reranked, rr.fuse)
        write_run(out / FUSED_RUN, fused, tag="distributed-ir-fused")
        rows["fused"] = evaluate(fused, eval_ds.qrels, DEFAULT_METRICS)
        report["rerank"]["fusion_weight"] = rr.fuse
    return result.history
