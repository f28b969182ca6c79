"""Security defaults: no code from model repos, no pickles, safe YAML, manifest paths stay inside
the output folder, the local Ray head on 127.0.0.1 with token auth, no secrets in written configs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_ir.config import ModelConfig
from distributed_ir.index.corpus import inside, stage_corpus
from distributed_ir.index.pipeline import build_faiss, read_shard, shard_is_valid, write_shard
from distributed_ir.models.embedder import Embedder
from distributed_ir.redaction import redact
from distributed_ir.train.checkpoint import TRAINING_STATE_FILE, load_training_state

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("distributed_ir", "jobs", "benchmarks") for p in (REPO / d).rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_source_scan_no_unsafe_loaders():
    """Every torch.load passes weights_only=True; YAML only via safe_load; no pickle/eval;
    trust_remote_code never hard-coded to True."""
    problems = []
    assert len(SOURCES) > 20
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"):
                problems.append(f"{where}: yaml.{name} (use yaml.safe_load)")
            if owner in ("pickle", "cPickle", "dill", "joblib") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
            t = kw.get("trust_remote_code")
            if isinstance(t, ast.Constant) and t.value is True:
                problems.append(f"{where}: trust_remote_code=True hard-coded")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_is_off_by_default(tmp_path, tiny_bert):
    """A model folder that asks for its own code is refused, and that code never runs."""
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(tiny_bert, model)
    sentinel = tmp_path / "code_ran"
    (model / "evil_config.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('x')\n"
        "from transformers import BertConfig\nclass EvilConfig(BertConfig):\n    model_type = 'evil-bert'\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModel": "evil_config.EvilConfig"}
    cfg["model_type"] = "evil-bert"  # only the repo's own code could load it
    (model / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        Embedder.from_config(ModelConfig(name_or_path=str(model)))
    assert not sentinel.exists()


def test_weights_are_safetensors_and_state_is_weights_only(tmp_path, tiny_bert):
    emb = Embedder.from_config(ModelConfig(name_or_path=str(tiny_bert)))
    emb.save(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").rglob("*")}
    assert "model.safetensors" in files and not files & {"pytorch_model.bin", "model.bin"}
    # a training_state.pt carrying a pickled callable is refused, not executed
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    (tmp_path / "ck").mkdir()
    torch.save({"optimizer": Payload()}, tmp_path / "ck" / TRAINING_STATE_FILE)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        load_training_state(tmp_path / "ck")
    assert not sentinel.exists()


@pytest.mark.parametrize("bad", ["../escape.parquet", "embeddings/../../escape.parquet", "/etc/passwd"])
def test_manifest_paths_cannot_escape_the_output_dir(tmp_path, bad):
    out = tmp_path / "idx"
    out.mkdir()
    outside = write_shard(tmp_path, 0, ["a"], np.ones((1, 4), np.float32))  # a real file outside `out`
    (tmp_path / "escape.parquet").write_bytes((tmp_path / outside["file"]).read_bytes())
    entry = {"file": bad, "count": 1, "sha256": outside["sha256"]}
    assert not shard_is_valid(out, entry)  # never counted as done: it would be re-encoded
    with pytest.raises(ValueError, match="escapes"):
        read_shard(out, entry)
    with pytest.raises(ValueError, match="escapes"):
        build_faiss(out, {"shards": {"0": entry}, "model": "m", "dim": 4}, "Flat")
    with pytest.raises(ValueError, match="escapes"):
        inside(out, bad)
    assert inside(out, "embeddings/shard-00000.parquet") == (out / "embeddings/shard-00000.parquet").resolve()


@pytest.mark.ray
def test_stage_meta_paths_cannot_escape(tmp_path, ray_cluster):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"t {i}"}) + "\n" for i in range(4)))
    stage_corpus([corpus], tmp_path / "stage", 2)
    meta_file = tmp_path / "stage" / "stage.json"
    meta = json.loads(meta_file.read_text())
    meta["shards"][0]["file"] = "../../c.jsonl"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="escapes"):
        stage_corpus([corpus], tmp_path / "stage", 2)


def test_redact_hides_secret_values():
    cfg = {"model": {"name_or_path": "m", "hf_token": "hf_abc"}, "db": [{"password": "pw"}],
           "max_tokens": 5, "api_key": "", "tokenizer": "t"}
    out = redact(cfg)
    assert out == {"model": {"name_or_path": "m", "hf_token": "***"}, "db": [{"password": "***"}],
                   "max_tokens": 5, "api_key": "", "tokenizer": "t"}
    assert "hf_abc" not in json.dumps(out)


@pytest.mark.ray
def test_local_ray_head_binds_loopback_with_token_auth():
    """init_ray's local cluster: dashboard on 127.0.0.1, token auth on, and a client without the
    token is refused. (Ray 2.60 rewrites a 127.0.0.1 node address to the machine's reachable IP
    (services.resolve_ip_for_localhost), so token auth, not the bind address, guards GCS/raylet.)"""
    script = f"""
import json, os, sys
sys.path.insert(0, {str(REPO)!r})
from distributed_ir.train.launch import init_ray
import ray
init_ray(num_cpus=1)
from ray._raylet import AuthenticationMode, get_authentication_mode
ctx = ray.get_runtime_context()
node = ray._private.worker.global_worker.node
import urllib.request, urllib.error
def status(headers):
    req = urllib.request.Request("http://" + node.webui_url + "/api/jobs/", headers=headers)
    try:
        return urllib.request.urlopen(req, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code
token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
print(json.dumps({{"ip": node.node_ip_address, "gcs": node.gcs_address, "dashboard": node.webui_url,
                  "token": get_authentication_mode() == AuthenticationMode.TOKEN,
                  "env": os.environ.get("RAY_AUTH_MODE"), "no_token": status({{}}),
                  "wrong_token": status({{"Authorization": "Bearer nope"}}),
                  "with_token": status({{"Authorization": "Bearer " + token}})}}))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    import tempfile

    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # AF_UNIX paths: <= 107 bytes
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["gcs"].startswith(info["ip"] + ":")
    assert info["dashboard"].startswith("127.0.0.1:")
    assert info["token"] and info["env"] == "token"
    assert (info["no_token"], info["wrong_token"], info["with_token"]) == (401, 403, 200)
    token = Path.home() / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o077 == 0
