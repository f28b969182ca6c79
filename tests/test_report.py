"""Run report: report.md + valid PNG plots from synthetic metrics and training history."""

from __future__ import annotations

import re

from PIL import Image

from distributed_ir.report import LOSS_PNG, METRICS_PNG, RERANKER_LOSS_PNG, write_report


def _history(n=12):
    return [{"step": 5 * (i + 1), "total_steps": 5 * n, "epoch": 0, "loss": 2.0 / (i + 1), "lr": 5e-5 * (1 - i / n),
             "grad_norm": 1.0, "samples_per_s": 30.0} for i in range(n)]


def test_report_with_three_rows_and_history(tmp_path):
    metrics = {"metrics": {
        "base": {"ndcg@10": 0.645, "mrr@10": 0.61, "recall@100": 0.92, "map@100": 0.60, "num_queries": 300},
        "finetuned": {"ndcg@10": 0.732, "mrr@10": 0.70, "recall@100": 0.95, "map@100": 0.69, "num_queries": 300},
        "reranked": {"ndcg@10": 0.760, "mrr@10": 0.73, "recall@100": 0.95, "map@100": 0.72, "num_queries": 300},
    }, "train": {"seconds": 1020.4, "records": 809}, "finished": "2030-01-01 00:00:00"}
    report = write_report(tmp_path, metrics, _history())
    text = report.read_text()
    for png in (LOSS_PNG, METRICS_PNG):
        assert f"]({png})" in text
        with Image.open(tmp_path / png) as img:
            img.verify()
        with Image.open(tmp_path / png) as img:
            assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
            # not a blank canvas: bars and lines draw many distinct colours
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
    assert re.search(r"\| finetuned \| 0\.7320 \| 0\.7000 \| 0\.9500 \| 0\.6900 \|", text)
    assert "finetuned vs base: ndcg@10 +0.0870" in text and "reranked vs finetuned: ndcg@10 +0.0280" in text
    assert "num_queries" not in text  # counts are not scores: neither tabled nor plotted
    assert "12 logged steps, step 5 to 60: loss 2.0000 -> 0.1667" in text and "Training took 1020 s on 809" in text


def test_report_with_only_some_inputs(tmp_path):
    report = write_report(tmp_path / "a", {"finetuned": {"ndcg@10": 0.5, "recall@100": 0.9}}, [])
    text = report.read_text()
    assert "No training history was recorded." in text and f"]({METRICS_PNG})" in text
    assert not (tmp_path / "a" / LOSS_PNG).exists()
    text = write_report(tmp_path / "b", {}, _history(3)).read_text()
    assert "No retrieval metrics were given." in text and (tmp_path / "b" / LOSS_PNG).is_file()


def test_report_with_fused_row_and_reranker_section(tmp_path):
    row = {"ndcg@10": 0.70, "mrr@10": 0.66, "recall@100": 0.95, "map@100": 0.65, "num_queries": 300}
    metrics = {"metrics": {"finetuned": row, "reranked": {**row, "ndcg@10": 0.68},
                           "fused": {**row, "ndcg@10": 0.7461}},
               "reranker_mining": {"queries": 809, "negatives": 5663, "dropped_positives": 870, "records": 809},
               "reranker_train": {"seconds": 1260.2, "records": 809, "task": "cross_encoder"},
               "rerank": {"top_k": 100, "pairs": 30000, "pairs_per_s": 41.27, "actors": 2, "fusion_weight": 0.5}}
    text = write_report(tmp_path, metrics, _history(4), _history(6)).read_text()
    assert re.search(r"\| fused \| 0\.7461 \|", text) and "fused vs finetuned: ndcg@10 +0.0461" in text
    assert "reranked vs finetuned: ndcg@10 -0.0200" in text
    section = text[text.index("## Reranker"):]
    assert "A cross_encoder trained on 809 records" in section and "dropped_positives 870" in section
    assert "Reranker training took 1260 s." in section and "30000 pairs at 41.3 pairs/s on 2 actors" in section
    assert "fused with weight 0.5" in section and "6 logged steps, step 5 to 30" in section
    assert f"]({RERANKER_LOSS_PNG})" in section
    with Image.open(tmp_path / RERANKER_LOSS_PNG) as img:
        assert img.format == "PNG" and img.size[0] > 400
    # a pipeline without the reranker stage has no such section or plot
    assert "## Reranker" not in write_report(tmp_path / "plain", {"finetuned": row}, _history(2)).read_text()
    assert not (tmp_path / "plain" / RERANKER_LOSS_PNG).exists()


def test_report_with_hybrid_row_and_distillation_line(tmp_path):
    row = {"ndcg@10": 0.70, "mrr@10": 0.66, "recall@100": 0.95, "map@100": 0.65, "num_queries": 300}
    metrics = {"metrics": {"bm25": {**row, "ndcg@10": 0.676}, "finetuned": row, "hybrid": {**row, "ndcg@10": 0.7698}},
               "train": {"seconds": 60.0, "records": 809},
               "distill": {"teacher": "/m/ce", "scored_records": 800, "kept_scores": 9, "pairs": 7200,
                           "pairs_per_s": 120.5, "dropped_without_negatives": 0}}
    text = write_report(tmp_path, metrics, _history(4)).read_text()
    assert "| bm25 | 0.6760 |" in text and "hybrid vs finetuned: ndcg@10 +0.0698" in text
    assert ("Distillation: the teacher /m/ce scored 800 records (7200 pairs at 120.5 pairs/s); 9 kept their given "
            "scores, 0 without negatives were dropped.") in text
