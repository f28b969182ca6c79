"""`distributed-ir index | search | mine | rerank`: one typed config each, read from flags (the same
flags as before the configs existed), a `--config FILE` YAML and `key=value` overrides; flags win."""

from __future__ import annotations

import json

import pytest

from distributed_ir import cli
from distributed_ir.config_loader import ConfigError, to_dict

PRECISION = {"precision": "auto", "min_cosine": 0.99, "precision_cache": "", "calibration_texts": 32}
# Each command's flags, their defaults and the required ones, as the hand-written parser had them.
TODAY = {
    "index": {
        "flags": ["--model", "--corpus", "--out", "--index-type", "--num-shards", "--index-shards", "--batch-size",
                  "--precision", "--min-cosine", "--precision-cache", "--calibration-texts", "--use-gpu", "--actors",
                  "--min-actors", "--max-actors", "--actor-resource", "--actor-start-timeout", "--max-text-bytes",
                  "--on-error", "--rejects"],
        "required": ["--corpus", "c.jsonl", "--out", "idx"],
        "defaults": {"model": "default", "index_type": "Flat", "num_shards": 4, "index_shards": 1, "batch_size": 64,
                     **PRECISION, "use_gpu": False, "actors": 0, "min_actors": 0, "max_actors": 0,
                     "actor_resources": {}, "actor_start_timeout_s": 600, "max_text_bytes": 1 << 20,
                     "on_error": "raise", "rejects_path": ""},
    },
    "search": {
        "flags": ["--index", "--queries", "--qrels", "--out", "--top-k", "--batch-size", "--precision", "--min-cosine",
                  "--precision-cache", "--calibration-texts", "--use-gpu", "--actors", "--searchers",
                  "--searcher-gpus", "--actor-start-timeout", "--on-error", "--rejects"],
        "required": ["--index", "idx", "--queries", "q.jsonl", "--out", "run.trec"],
        "defaults": {"qrels": "", "top_k": 100, "batch_size": 64, **PRECISION, "use_gpu": False, "actors": 0,
                     "searchers": 0, "searcher_gpus": 0.0, "actor_start_timeout_s": 600, "on_error": "raise",
                     "rejects_path": ""},
    },
    "mine": {
        "flags": ["--index", "--dataset", "--split", "--out", "--rank-start", "--rank-end", "--per-query", "--seed",
                  "--batch-size", "--precision", "--min-cosine", "--precision-cache", "--calibration-texts",
                  "--actors", "--searchers"],
        "required": ["--index", "idx", "--dataset", "beir", "--out", "mined.jsonl"],
        "defaults": {"split": "train", "rank_start": 10, "rank_end": 100, "per_query": 8, "seed": 42,
                     "batch_size": 64, **PRECISION, "actors": 0, "searchers": 0},
    },
    "rerank": {
        "flags": ["--model", "--run", "--dataset", "--split", "--top-k", "--out", "--batch-size", "--precision",
                  "--min-cosine", "--precision-cache", "--calibration-texts", "--actors", "--use-gpu", "--fuse",
                  "--compile"],
        "required": ["--model", "ce", "--run", "run.trec", "--dataset", "beir", "--out", "rr"],
        "defaults": {"split": "test", "top_k": 100, "batch_size": 32, **PRECISION, "actors": 0, "use_gpu": False,
                     "fuse": None, "compile": False},
    },
}
PRECISION_FLAGS = ["--precision", "int8", "--min-cosine", "0.9", "--precision-cache", "/cache", "--calibration-texts",
                   "8"]
PRECISION_SET = {"precision": "int8", "min_cosine": 0.9, "precision_cache": "/cache", "calibration_texts": 8}
# Every flag of today's parser given a non-default value, and the config it must give.
EVERY_FLAG = {
    "index": (["--model", "m", "--corpus", "a.jsonl", "dir/", "--out", "idx", "--index-type", "IVF4,Flat",
               "--num-shards", "8", "--index-shards", "2", "--batch-size", "16", *PRECISION_FLAGS, "--use-gpu",
               "--actors", "3", "--min-actors", "1", "--max-actors", "5", "--actor-resource", "encoder=1",
               "--actor-resource", "pool=0.5", "--actor-start-timeout", "30", "--max-text-bytes", "100",
               "--on-error", "skip", "--rejects", "bad.jsonl"],
              {"model": "m", "corpus": ["a.jsonl", "dir/"], "out": "idx", "index_type": "IVF4,Flat", "num_shards": 8,
               "index_shards": 2, "batch_size": 16, **PRECISION_SET, "use_gpu": True, "actors": 3, "min_actors": 1,
               "max_actors": 5, "actor_resources": {"encoder": 1.0, "pool": 0.5}, "actor_start_timeout_s": 30,
               "max_text_bytes": 100, "on_error": "skip", "rejects_path": "bad.jsonl"}),
    "search": (["--index", "idx", "--queries", "q.jsonl", "--qrels", "qrels/test.tsv", "--out", "run.trec",
                "--top-k", "5", "--batch-size", "8", *PRECISION_FLAGS, "--use-gpu", "--actors", "2", "--searchers",
                "3", "--searcher-gpus", "0.5", "--actor-start-timeout", "30", "--on-error", "skip",
                "--rejects", "bad.jsonl"],
               {"index": "idx", "queries": "q.jsonl", "qrels": "qrels/test.tsv", "out": "run.trec", "top_k": 5,
                "batch_size": 8, **PRECISION_SET, "use_gpu": True, "actors": 2, "searchers": 3, "searcher_gpus": 0.5,
                "actor_start_timeout_s": 30, "on_error": "skip", "rejects_path": "bad.jsonl"}),
    "mine": (["--index", "idx", "--dataset", "beir", "--split", "dev", "--out", "m.jsonl", "--rank-start", "2",
              "--rank-end", "20", "--per-query", "4", "--seed", "7", "--batch-size", "8", *PRECISION_FLAGS,
              "--actors", "2", "--searchers", "3"],
             {"index": "idx", "dataset": "beir", "split": "dev", "out": "m.jsonl", "rank_start": 2, "rank_end": 20,
              "per_query": 4, "seed": 7, "batch_size": 8, **PRECISION_SET, "actors": 2, "searchers": 3}),
    "rerank": (["--model", "ce", "--run", "run.trec", "--dataset", "beir", "--split", "dev", "--top-k", "10",
                "--out", "rr", "--batch-size", "4", *PRECISION_FLAGS, "--actors", "2", "--use-gpu", "--fuse", "0.3",
                "--compile"],
               {"model": "ce", "run": "run.trec", "dataset": "beir", "split": "dev", "top_k": 10, "out": "rr",
                "batch_size": 4, **PRECISION_SET, "actors": 2, "use_gpu": True, "fuse": 0.3, "compile": True}),
}


def _config(argv: list[str]):
    return cli.command_config(cli.parse_args(argv))


@pytest.fixture(autouse=True)
def _no_output_root(monkeypatch):
    monkeypatch.delenv("IR_OUTPUT_ROOT", raising=False)  # relative paths stay as typed


@pytest.mark.parametrize("command", sorted(TODAY))
def test_flags_and_defaults_are_todays(command):
    parser = cli.build_parser()._subparsers._group_actions[0].choices[command]
    flags = [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help", "--config")]
    assert flags == TODAY[command]["flags"]
    got = to_dict(_config([command, *TODAY[command]["required"]]))
    assert {k: got[k] for k in TODAY[command]["defaults"]} == TODAY[command]["defaults"]


@pytest.mark.parametrize("command", sorted(EVERY_FLAG))
def test_every_flag_reaches_the_typed_config(command):
    argv, expected = EVERY_FLAG[command]
    assert to_dict(_config([command, *argv])) == expected


@pytest.mark.parametrize("command", sorted(EVERY_FLAG))
def test_config_file_then_overrides_then_flags(command, tmp_path):
    """The whole config from YAML; a dotted override and a flag change one key each; the flag wins
    over both the file and an override of the same key."""
    _, expected = EVERY_FLAG[command]
    cfg_file = tmp_path / f"{command}.yaml"
    cfg_file.write_text(json.dumps(expected))  # JSON is YAML
    assert to_dict(_config([command, "--config", str(cfg_file)])) == expected
    got = to_dict(_config([command, "--config", str(cfg_file), "batch_size=3", "calibration_texts=5",
                           "--calibration-texts", "6", "precision=fp32"]))
    assert got == expected | {"batch_size": 3, "calibration_texts": 6, "precision": "fp32"}


def test_list_and_mapping_keys_from_file_overrides_and_flags(tmp_path):
    cfg_file = tmp_path / "index.yaml"
    cfg_file.write_text("corpus: [a.jsonl]\nout: idx\nactor_resources:\n  encoder: 1\n")
    cfg = _config(["index", "--config", str(cfg_file), "actor_resources.pool=2", "--actor-resource", "encoder=3"])
    assert cfg.actor_resources == {"encoder": 3.0, "pool": 2.0} and cfg.corpus == ["a.jsonl"]
    # --corpus takes every value up to the next flag: trailing overrides of known keys are overrides
    cfg = _config(["index", "--out", "idx", "--corpus", "a.jsonl", "b=c.jsonl", "num_shards=2", "batch_size=8"])
    assert cfg.corpus == ["a.jsonl", "b=c.jsonl"] and (cfg.num_shards, cfg.batch_size) == (2, 8)
    with pytest.raises(ConfigError, match=r"--actor-resource 'encoder': expected NAME=AMOUNT"):
        _config(["index", "--corpus", "a", "--out", "o", "--actor-resource", "encoder"])
    with pytest.raises(ConfigError, match=r"actor_resources\.encoder: expected a number, got 'x'"):
        _config(["index", "--corpus", "a", "--out", "o", "--actor-resource", "encoder=x"])


@pytest.mark.parametrize("command, text, line, key", [
    ("index", "corpus: [a.jsonl]\nout: idx\nnum_shard: 2\n", 3, "num_shard"),
    ("search", "index: idx\nqueries: q.jsonl\nout: run.trec\ntop_k: many\n", 4, "top_k"),
    ("mine", "index: idx\ndataset: beir\nout: m.jsonl\nrank_start: 50\nrank_end: 20\n", 4, "rank_start"),
    ("rerank", "model: ce\nrun: r.trec\ndataset: beir\nout: rr\nfuse: 1.5\n", 5, "fuse"),
])
def test_a_bad_key_in_the_file_is_named_with_file_and_line(command, text, line, key, tmp_path, capsys):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    assert cli.main([command, "--config", str(cfg_file)]) == 2
    assert f"distributed-ir {command}: error: {cfg_file}:{line}: field '{key}'" in capsys.readouterr().err


def test_a_bad_flag_is_not_blamed_on_the_file(tmp_path):
    cfg_file = tmp_path / "search.yaml"
    cfg_file.write_text("index: idx\nqueries: q.jsonl\nout: run.trec\ntop_k: 5\n")
    with pytest.raises(ConfigError) as err:
        _config(["search", "--config", str(cfg_file), "--top-k", "0"])
    assert str(err.value) == "top_k=0: must be >= 1"


def test_required_flags_may_come_from_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["search", "--index", "idx"])
    assert stop.value.code == 2
    assert "the following arguments are required: --queries, --out" in capsys.readouterr().err
    cfg_file = tmp_path / "search.yaml"
    cfg_file.write_text("queries: q.jsonl\n")
    with pytest.raises(SystemExit):
        cli.main(["search", "--index", "idx", "--config", str(cfg_file)])
    assert f"required: --out (or their keys in {cfg_file})" in capsys.readouterr().err
    assert _config(["search", "--index", "idx", "--config", str(cfg_file), "out=run.trec"]).queries == "q.jsonl"


def test_relative_outputs_go_under_ir_output_root(tmp_path, monkeypatch):
    monkeypatch.setenv("IR_OUTPUT_ROOT", str(tmp_path))
    cfg = _config(["mine", "--index", "idx", "--dataset", "beir", "--out", "m.jsonl"])
    assert (cfg.index, cfg.out, cfg.dataset) == (str(tmp_path / "idx"), str(tmp_path / "m.jsonl"), "beir")


def test_handlers_get_the_config_as_keywords(tmp_path, monkeypatch, capsys):
    """Each command hands its config's values to its handler by name and prints the handler's summary."""
    import distributed_ir.mining
    from distributed_ir.eval import rerank
    from distributed_ir.index import search
    from distributed_ir.train import launch

    calls: dict[str, dict] = {}

    def handler(name: str, result):
        def record(**kw):
            calls[name] = kw
            return result
        return record

    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(search, "search_index", handler("search", (
        {}, {"queries": 4, "input": {"input": 5, "accepted": 4, "rejected": 1}})))
    monkeypatch.setattr(distributed_ir.mining, "mine_command", handler("mine", {"records": 2}))
    monkeypatch.setattr(rerank, "rerank_command", handler("rerank", {"speed": {"pairs": 9}, "model": "ce"}))
    printed = {}
    for command in ("search", "mine", "rerank"):
        assert cli.main([command, *EVERY_FLAG[command][0]]) == 0
        printed[command] = json.loads(capsys.readouterr().out)
        policy = calls[command].pop("precision")
        assert (policy.precision, policy.min_cosine, policy.cache_dir, policy.calibration_texts) == (
            "int8", 0.9, "/cache", 8)
    assert printed == {"search": {"queries": 4, "input_rows": 5, "accepted": 4, "rejected": 1},
                       "mine": {"records": 2}, "rerank": {"speed": {"pairs": 9}}}
    check = calls["search"].pop("check")
    assert (check.on_error, str(check.rejects_path)) == ("skip", "bad.jsonl")
    assert calls["search"] == {"index_dir": "idx", "queries_path": "q.jsonl", "out": "run.trec", "top_k": 5,
                               "qrels_path": "qrels/test.tsv", "batch_size": 8, "use_gpu": True, "actors": 2,
                               "searchers": 3, "searcher_gpus": 0.5, "actor_start_timeout_s": 30}
    assert calls["mine"] == {"index_dir": "idx", "dataset_dir": "beir", "split": "dev", "out": "m.jsonl",
                             "rank_start": 2, "rank_end": 20, "per_query": 4, "seed": 7, "batch_size": 8, "actors": 2,
                             "searchers": 3}
    assert calls["rerank"] == {"model": "ce", "run_path": "run.trec", "dataset_dir": "beir", "out": "rr", "top_k": 10,
                               "split": "dev", "batch_size": 4, "actors": 2, "use_gpu": True, "fuse": 0.3,
                               "compile": True}


def test_index_hands_every_key_to_index_options(tmp_path, monkeypatch):
    """IndexCommandConfig's keys are IndexOptions' own: the whole config reaches the encode stage."""
    from distributed_ir.index import pipeline

    seen = {}

    def stop(opts):
        seen["opts"] = opts
        raise ConfigError("stopped before the cluster")

    monkeypatch.setattr(pipeline, "check_inputs", stop)
    argv, expected = EVERY_FLAG["index"]
    assert cli.main(["index", *argv]) == 2
    opts = seen["opts"]
    assert {k: getattr(opts, k) for k in expected} == expected
