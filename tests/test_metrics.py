"""Metrics equal pytrec_eval (trec_eval) to 1e-9 on random runs with graded qrels, ties, misses."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import pytrec_eval

from distributed_ir.eval.metrics import evaluate, evaluate_per_query, rank, read_run, write_run
from tests.conftest import PYTREC_MEASURES as TREC
from tests.conftest import pytrec_means, run_cli


def _random_case(seed: int, decimals: int | None = 1):
    """Random graded qrels and run; scores rounded to ``decimals`` (1: many ties) or full precision (None)."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(60):
        qid = f"q{q}"
        if q % 10 != 3:  # some queries only in the run
            judged = rng.sample(docs, rng.randint(1, 25))
            qrels[qid] = {d: rng.choice([0, 0, 1, 1, 2, 3]) for d in judged}
        if q % 10 != 7:  # some queries only in the qrels
            retrieved = rng.sample(docs, rng.randint(5, 150))
            # coarse scores -> many ties, broken by doc id as trec_eval does
            run[qid] = {d: rng.random() if decimals is None else round(rng.random(), decimals) for d in retrieved}
    qrels["q_zero"] = {"d1": 0, "d2": 0}  # judged, nothing relevant
    run["q_zero"] = {"d1": 0.5, "d2": 0.4}
    return run, qrels


@pytest.mark.parametrize("seed", range(5))
def test_equal_to_pytrec_eval(seed):
    run, qrels = _random_case(seed)
    ours = evaluate_per_query(run, qrels)
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"})
    theirs = ev.evaluate(run)
    # MRR@10 = trec_eval's recip_rank on the run cut to its top 10
    cut = {q: {d: s[d] for d in rank(s)[:10]} for q, s in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    assert set(ours) == set(theirs) == set(mrr)
    assert "q3" not in ours and "q7" not in ours and "q_zero" in ours
    for qid in ours:
        for name, key in TREC.items():
            assert abs(ours[qid][name] - theirs[qid][key]) < 1e-9, (qid, name)
        assert abs(ours[qid]["mrr@10"] - mrr[qid]["recip_rank"]) < 1e-9, qid
    means = evaluate(run, qrels)
    for name, key in TREC.items():
        assert abs(means[name] - sum(v[key] for v in theirs.values()) / len(theirs)) < 1e-9
    assert means["num_queries"] == len(theirs)
    assert means["num_qrels_queries_missing_from_run"] == sum(1 for q in qrels if q not in run)


def test_ties_broken_by_doc_id_descending():
    assert rank({"a": 1.0, "c": 1.0, "b": 2.0}) == ["b", "c", "a"]


def test_run_file_roundtrip_and_cli(tmp_path):
    run, qrels = _random_case(11, decimals=None)  # full-precision scores
    write_run(tmp_path / "run.trec", run)
    assert read_run(tmp_path / "run.trec") == run
    with (tmp_path / "qrels.tsv").open("w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for q, rels in qrels.items():
            for d, r in rels.items():
                fh.write(f"{q}\t{d}\t{r}\n")
    out = tmp_path / "m.json"
    res = run_cli("evaluate", "--run", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.tsv"),
                  "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(out.read_text())
    theirs = pytrec_means(run, qrels)  # pytrec_eval on the in-memory run, not our own evaluate
    assert theirs["num_queries"] == metrics["num_queries"] == 49  # 60 - 6 without qrels - 6 without run + q_zero
    for name in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
        assert metrics[name] == pytest.approx(theirs[name], abs=1e-12), name


def test_run_file_keeps_scores_that_differ_below_six_decimals(tmp_path):
    """run.trec evaluates as the in-memory run did: no ties made up by rounding scores (issue #15)."""
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}}
    # relevant docs 1e-7 above non-relevant ones that would win a tie (ties go to the larger doc id)
    run = {"q1": {"a": 0.5000001, "z": 0.5}, "q2": {"c": 0.1234567, "b": 0.1234566, "a": 0.1234568}}
    float32 = {"q3": {"x": float(np.float32(0.7) + np.float32(6e-8)), "y": float(np.float32(0.7))}}
    write_run(tmp_path / "run.trec", {**run, **float32})
    back = read_run(tmp_path / "run.trec")
    ours = evaluate(run, qrels)
    assert ours["mrr@10"] == 0.75 and evaluate(back, qrels) == ours  # q1: 1, q2: 1/2
    with (tmp_path / "run.trec").open() as fh:  # the file as pytrec_eval reads it, not through read_run
        theirs = pytrec_means(dict(pytrec_eval.parse_run(fh)), qrels)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert back == {**run, **float32}  # exact: float64 and float32 values round-trip


def test_bad_run_line_is_named(tmp_path):
    (tmp_path / "r.trec").write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 high tag\n")
    from distributed_ir.data.errors import DataError

    with pytest.raises(DataError, match=r"r\.trec:2: field 'score'"):
        read_run(tmp_path / "r.trec")
