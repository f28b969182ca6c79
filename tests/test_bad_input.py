"""Bad input, one case per test: the default error names file, line and field; with
``on_error=skip`` the row goes to the rejects file and input == accepted + rejected per file."""

from __future__ import annotations

import json
import re

import pytest

from distributed_ir.config import PipelineConfig, TrainConfig
from distributed_ir.config_loader import ConfigError, load_config
from distributed_ir.data import DataError, load_beir, load_corpus, load_queries, read_records
from distributed_ir.data.beir import load_beir_splits
from distributed_ir.data.intake import InputCheck
from distributed_ir.index.corpus import stage_corpus
from tests.conftest import refuse_corpus_reads, run_cli

GOOD_DOCS = [{"_id": f"d{i}", "title": f"T{i}", "text": f"doc {i}"} for i in range(4)]
GOOD_QUERIES = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(3)]
QRELS = ["query-id\tcorpus-id\tscore", "q0\td0\t1", "q1\td1\t1", "q2\td2\t1"]
TEN_MB = "word " * (2 * 1024 * 1024)


def _lines(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _beir(tmp_path, corpus=None, queries=None, qrels=None):
    d = tmp_path / "ds"
    (d / "qrels").mkdir(parents=True)
    (d / "corpus.jsonl").write_bytes(_lines(corpus or GOOD_DOCS))
    (d / "queries.jsonl").write_bytes(_lines(queries or GOOD_QUERIES))
    (d / "qrels" / "test.tsv").write_text("\n".join(qrels or QRELS) + "\n")
    return d


def _with_bad(good, bad, at=2):
    rows = list(good)
    rows.insert(at - 1, bad)  # bad row on line `at`
    return rows


# (name, file written, bad line, expected field, message regex, loader)
def _corpus_case(bad):
    return lambda tmp, check: load_beir(_beir(tmp, corpus=_with_bad(GOOD_DOCS, bad)), "test", check=check)


def _queries_case(bad):
    return lambda tmp, check: load_beir(_beir(tmp, queries=_with_bad(GOOD_QUERIES, bad)), "test", check=check)


def _qrels_case(row):
    return lambda tmp, check: load_beir(_beir(tmp, qrels=QRELS[:2] + [row] + QRELS[2:]), "test", check=check)


def _train_case(good, bad):
    def load(tmp, check):
        path = tmp / "train.jsonl"
        path.write_bytes(_lines(_with_bad([good] * 3, bad)))
        return read_records(path, check=check)
    return load


def _stage_case(bad):
    def load(tmp, check):
        a = tmp / "a.jsonl"
        a.write_bytes(_lines(GOOD_DOCS))
        b = tmp / "corpus.jsonl"
        b.write_bytes(_lines([{"_id": "e0", "text": "fine"}, bad]))
        return stage_corpus([a, b], tmp / "stage", 2, check)
    return load


def _pipeline_path(folder, check, splits=("test",)):
    """What the pipeline runs (stages.dataset_stage): queries and qrels read here, the corpus staged on
    Ray, the qrels' document ids checked on the staged shards."""
    from distributed_ir.config import EvalConfig, InputConfig
    from distributed_ir.stages import dataset_stage

    inp = InputConfig(on_error=check.on_error, max_text_bytes=check.max_text_bytes)
    with pytest.MonkeyPatch.context() as mp:
        refuse_corpus_reads(mp)
        datasets, _ = dataset_stage(folder, list(splits), folder.parent / "index", EvalConfig(num_shards=2), inp, check)
    return datasets


def _staged_qrels_case(row):
    return lambda tmp, check: _pipeline_path(_beir(tmp, qrels=QRELS[:2] + [row] + QRELS[2:]), check)


PAIR = {"query": "q", "positive": ["p"]}
SCORED = {"query": "q", "document": "d", "label": 1}

CASES = [
    ("corpus malformed JSON", "corpus.jsonl", 2, None, r"malformed JSON: .* \(column \d+\)",
     _corpus_case(b'{"_id": "x", "text": "a"')),
    ("corpus missing id", "corpus.jsonl", 2, "_id", "missing", _corpus_case({"text": "a"})),
    ("corpus empty id", "corpus.jsonl", 2, "_id", "empty id", _corpus_case({"_id": " ", "text": "a"})),
    ("corpus duplicate id", "corpus.jsonl", 2, "_id", r"duplicate id 'd0' \(first on line 1\)",
     _corpus_case({"_id": "d0", "text": "again"})),
    ("corpus empty text", "corpus.jsonl", 2, "text", "empty document", _corpus_case({"_id": "x", "text": "  "})),
    ("corpus wrong type", "corpus.jsonl", 2, "text", "expected a string, got int", _corpus_case({"_id": "x", "text": 5})),
    ("corpus id wrong type", "corpus.jsonl", 2, "_id", "expected a string id, got list",
     _corpus_case({"_id": ["x"], "text": "a"})),
    ("corpus 10 MB document", "corpus.jsonl", 2, "text", r"text is 10485760 bytes, over max_text_bytes=1048576",
     _corpus_case({"_id": "big", "text": TEN_MB})),
    ("queries invalid UTF-8", "queries.jsonl", 2, "text", "invalid UTF-8",
     _queries_case(b'{"_id": "qx", "text": "caf\xe9 \xff"}')),
    ("queries duplicate id", "queries.jsonl", 2, "_id", "duplicate id 'q0'", _queries_case({"_id": "q0", "text": "b"})),
    ("queries empty text", "queries.jsonl", 2, "text", "empty query text", _queries_case({"_id": "qx", "text": ""})),
    ("qrels unknown query", "test.tsv", 3, "query-id", "unknown query id 'q9'", _qrels_case("q9\td0\t1")),
    ("qrels unknown document", "test.tsv", 3, "corpus-id", "unknown document id 'd9'", _qrels_case("q0\td9\t1")),
    ("staging: qrels unknown document", "test.tsv", 3, "corpus-id", "unknown document id 'd9'",
     _staged_qrels_case("q0\td9\t1")),
    ("qrels non-integer score", "test.tsv", 3, "score", "relevance 'high' is not an integer",
     _qrels_case("q0\td1\thigh")),
    ("scored non-numeric label", "train.jsonl", 2, "label", "expected a finite number, got 'relevant'",
     _train_case(SCORED, {**SCORED, "label": "relevant"})),
    ("pair wrong type", "train.jsonl", 2, "positive", "expected a list of strings, got str",
     _train_case(PAIR, {"query": "q", "positive": "p"})),
    ("training malformed JSON", "train.jsonl", 2, None, "malformed JSON", _train_case(PAIR, b'{"query": "q",')),
    ("training 10 MB positive", "train.jsonl", 2, "positive", "over max_text_bytes",
     _train_case(PAIR, {"query": "q", "positive": ["ok", TEN_MB]})),
    ("staging duplicate across files", "corpus.jsonl", 2, "_id", r"duplicate id 'd1', first at .*a\.jsonl:2",
     _stage_case({"_id": "d1", "text": "again"})),
    ("staging 10 MB document", "corpus.jsonl", 2, "text", "over max_text_bytes", _stage_case({"_id": "e1", "text": TEN_MB})),
    # valid JSON ("\\ud800"), not Unicode text: no UTF-8 writer, tokenizer or Arrow table takes it
    ("corpus lone surrogate id", "corpus.jsonl", 2, "_id", r"not valid Unicode text: a lone surrogate '\\ud800' at "
     "character 0", _corpus_case({"_id": "\ud800", "text": "a"})),
    ("queries lone surrogate", "queries.jsonl", 2, "text", r"lone surrogate '\\udc00' at character 4",
     _queries_case({"_id": "qx", "text": "caf\u00e9\udc00"})),
    ("training lone surrogate", "train.jsonl", 2, "positive", "lone surrogate",
     _train_case(PAIR, {"query": "q", "positive": ["ok", "x\ud83d"]})),
    ("staging lone surrogate id", "corpus.jsonl", 2, "_id", r"lone surrogate '\\ud800' at character 0",
     _stage_case({"_id": "\ud800", "text": "a"})),
    ("staging lone surrogate text", "corpus.jsonl", 2, "text", "lone surrogate", _stage_case({"_id": "e1", "text": "x\udfff"})),
]


def _ray_for_staging(request, name: str) -> None:
    """Staging runs in Ray tasks: its cases start the module's local cluster (once)."""
    if name.startswith("staging"):
        request.getfixturevalue("ray_cluster")


@pytest.mark.parametrize("name, file, line, field, message, load", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_with_file_line_field(request, tmp_path, name, file, line, field, message, load):
    _ray_for_staging(request, name)
    with pytest.raises(DataError) as info:
        load(tmp_path, InputCheck("raise"))
    err = info.value
    assert err.path.endswith(file) and err.line == line and err.field == field
    where = rf"{file}:{line}: " + (rf"field '{field}': " if field else "")
    assert re.search(where + ".*" + message, str(err)), str(err)
    assert len(str(err)) < 500  # the 10 MB text is never echoed


@pytest.mark.parametrize("name, file, line, field, message, load", CASES, ids=[c[0] for c in CASES])
def test_bad_input_skip_counts_and_rejects_file(request, tmp_path, name, file, line, field, message, load):
    _ray_for_staging(request, name)
    rejects = tmp_path / "out" / "rejects.jsonl"
    check = InputCheck("skip", rejects)
    load(tmp_path, check)
    summary = check.summary()
    for path, c in summary["files"].items():
        assert c["input"] == c["accepted"] + c["rejected"], (path, c)
    bad = {p: c for p, c in summary["files"].items() if c["rejected"]}
    assert len(bad) == 1 and next(iter(bad)).endswith(file) and next(iter(bad.values()))["rejected"] == 1
    assert summary["rejected"] == 1 and summary["rejects"] == str(rejects)
    entries = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["file"].endswith(file) and entry["line"] == line and entry["field"] == field
    assert re.search(message, entry["reason"])
    assert 0 < len(entry["excerpt"]) <= 200


def test_counts_are_independent_of_consumers(tmp_path):
    """input is counted when a row is read: a consumer that drops a row breaks the equality."""
    check = InputCheck("skip")
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(_lines(GOOD_DOCS + [b"", b"   "]))  # blank lines are not rows
    corpus = load_corpus(path, check)
    assert len(corpus) == 4 and check.summary()["files"][str(path)] == {"input": 4, "accepted": 4, "rejected": 0}
    load_queries(_beir(tmp_path / "q", queries=GOOD_QUERIES) / "queries.jsonl", check)
    assert check.summary()["input"] == 7


def test_skip_keeps_the_first_of_duplicates_and_qrels_for_rejected_docs_are_rejected(tmp_path):
    corpus = _with_bad(GOOD_DOCS, {"_id": "d5", "text": TEN_MB})
    check = InputCheck("skip", tmp_path / "rejects.jsonl")
    ds = load_beir(_beir(tmp_path, corpus=corpus, qrels=QRELS + ["q0\td5\t1"]), "test", check=check)
    assert "d5" not in ds.corpus and ds.qrels["q0"] == {"d0": 1}
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert reasons[0].startswith("text is") and reasons[1] == "unknown document id 'd5'"


@pytest.mark.ray
def test_pipeline_path_rejects_and_counts_as_the_corpus_in_the_driver(ray_cluster, tmp_path):
    """dataset_stage (corpus staged on Ray, qrels doc ids checked on the shards) gives the qrels, the
    counts and the rejects file, entry for entry and in order, that reading the corpus here gave."""
    corpus = _with_bad(_with_bad(GOOD_DOCS, {"_id": "d5", "text": TEN_MB}, at=3), b'{"_id": "x"', at=5)
    queries = _with_bad(GOOD_QUERIES, {"_id": "qx", "text": ""})
    test = QRELS[:2] + ["q1\td9\t1", "q2\td3\tbad", "q0\td5\t1", "q2\td9\t2"] + QRELS[2:]
    folder = _beir(tmp_path, corpus=corpus, queries=queries, qrels=test)
    (folder / "qrels" / "train.tsv").write_text("\n".join(["q9\td9\t1", "q2\td3\t1", "q2\td5\t0"]) + "\n")
    results = {}
    for name in ("driver", "staged"):
        check = InputCheck("skip", tmp_path / name / "rejects.jsonl")
        if name == "driver":
            datasets = load_beir_splits(folder, ["train", "test"], check=check)
        else:
            datasets = _pipeline_path(folder, check, ("train", "test"))
            assert all(ds.corpus is None and ds.unchecked is None for ds in datasets)
        results[name] = ([(list(ds.qrels.items()), ds.queries) for ds in datasets], check.summary(),
                         (tmp_path / name / "rejects.jsonl").read_text().splitlines())
    driver, staged = results["driver"], results["staged"]
    assert staged[0] == driver[0] and driver[0][1][0] == [("q0", {"d0": 1}), ("q1", {"d1": 1}), ("q2", {"d2": 1})]
    assert {k: v for k, v in staged[1].items() if k != "rejects"} == {k: v for k, v in driver[1].items()
                                                                      if k != "rejects"}
    assert list(staged[1]["files"]) == list(driver[1]["files"]) and list(driver[1]["files"])[0].endswith("corpus.jsonl")
    assert driver[1]["rejected"] == 9
    assert staged[2] == driver[2]
    assert [json.loads(x)["reason"] for x in staged[2]][-3:] == [
        "relevance 'bad' is not an integer", "unknown document id 'd5'", "unknown document id 'd9'"]
    # on_error=raise: the first unknown document of the first split, by its qrels FILE:LINE
    with pytest.raises(DataError, match=r"qrels/test\.tsv:3: field 'corpus-id': unknown document id 'd9'"):
        _pipeline_path(_beir(tmp_path / "r", qrels=QRELS[:2] + ["q1\td9\t1", "q0\td8\t1"] + QRELS[2:]),
                       InputCheck("raise"), ("test",))


# ---------------------------------------------------------------- configs: always raise

@pytest.mark.parametrize("text, cls, line, field, message", [
    ("train_path: x.jsonl\nbatch_sise: 4\n", TrainConfig, 2, "batch_sise", "unknown config key"),
    ("train_path: x.jsonl\noptim:\n  lr: 1.0e-4\n  warmup: 2\n", TrainConfig, 4, "optim.warmup", "unknown config key"),
    ("train_path: x.jsonl\nbatch_size: many\n", TrainConfig, 2, "batch_size", "expected int, got str"),
    ("train_path: x.jsonl\nscaling:\n  use_gpu: 3\n", TrainConfig, 3, "scaling.use_gpu", "expected true/false"),
    ("train:\n  model:\n    query_instruction: 'query: '\n", PipelineConfig, 3, "model.query_instruction",
     r"needs exactly one '\{\}'"),
    ("input:\n  on_error: ignore\n", PipelineConfig, 2, "input.on_error", "expected one of raise, skip"),
])
def test_config_errors_name_file_line_and_field(tmp_path, text, cls, line, field, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"cfg\.yaml:{line}: field '.*{field}': .*{message}"):
        load_config(cls, path)


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train_path: x\nbatch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:\d+: invalid YAML"):
        load_config(TrainConfig, path)


# ---------------------------------------------------------------- CLI

def test_cli_evaluate_raise_then_skip(tmp_path):
    (tmp_path / "run.trec").write_text("q0 Q0 d0 1 1.0 x\nq1 Q0 d1 1 1.0 x\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\tyes\n\nq1\td1\t1\n")
    res = run_cli("evaluate", "--run", "run.trec", "--qrels", "qrels.tsv", cwd=tmp_path)
    assert res.returncode == 2 and "qrels.tsv:3: field 'score': relevance 'yes' is not an integer" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("evaluate", "--run", "run.trec", "--qrels", "qrels.tsv", "--on-error", "skip", "--out",
                  "m/metrics.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "[input] 3 rows = 2 accepted + 1 rejected" in res.stderr
    entry = json.loads((tmp_path / "m" / "rejects.jsonl").read_text())
    assert entry["line"] == 3 and entry["field"] == "score" and entry["excerpt"] == "q1\td1\tyes"
    assert json.loads(res.stdout)["ndcg@10"] == 1.0


def test_cli_config_error_names_file_line_field(tmp_path):
    (tmp_path / "cfg.yaml").write_text("train_path: x.jsonl\nmodel:\n  document_instruction: 'passage'\n")
    res = run_cli("train", "embedder", "--config", "cfg.yaml", cwd=tmp_path)
    assert res.returncode == 2
    assert "cfg.yaml:3: field 'model.document_instruction'" in res.stderr and "Traceback" not in res.stderr


def test_an_excerpt_is_always_utf8_text():
    """A row accepted with a lone surrogate where nothing reads it (a key): its excerpt still writes."""
    from distributed_ir.data.intake import excerpt

    text = excerpt({"_id": "a", "\ud800": "caf\u00e9"})
    assert text.encode("utf-8") and "\\ud800" in text and "caf\u00e9" in text
