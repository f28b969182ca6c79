"""End to end through ``ray job submit``: a local head (127.0.0.1, free ports, token auth), the
shipped runtime_env, the working-dir upload, the pipeline job on 2 Ray Train workers.

Only the head this module starts is stopped (SIGTERM to its ``ray start --block`` process, which
tears down its own processes): ``ray stop`` would kill every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import pytrec_eval
import yaml

from tests.conftest import REPO, free_ports, pytrec_means, run_cli

BIN = Path(sys.executable).parent  # the venv's bin: `ray` and the `python` the job entrypoint runs
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
              "metrics-export-port")


def _head_processes(temp_dir: str) -> list:
    """Processes of this head only: their command lines name its private temp dir."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


class Head:
    def __init__(self) -> None:
        # short path: Ray's Unix sockets live under it (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="irjob-", dir="/tmp")
        token_file = Path(self.temp_dir) / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        self.token = token_file.read_text()
        ports = dict(zip(HEAD_PORTS, free_ports(len(HEAD_PORTS))))
        self.dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
        # no PYTHONPATH on the cluster: the job must import the code it uploads, nothing else
        self.env = {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # a throw-away head: no 30 s drain on SIGTERM
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--temp-dir", str(Path(self.temp_dir) / "ray"),
               "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
        self.log = open(Path(self.temp_dir) / "head.log", "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(f"{self.dashboard}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.head_log()}")
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"Ray head not ready after {timeout}s:\n{self.head_log()}")

    def head_log(self) -> str:
        return (Path(self.temp_dir) / "head.log").read_text()[-4000:]

    def ray(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `ray` CLI as a user runs it: RAY_ADDRESS + RAY_AUTH_MODE=token + the token file."""
        env = {**self.env, "RAY_ADDRESS": self.dashboard, **(env or {})}
        return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> list[str]:
        """Stop this head; return the command lines of its processes that outlived it (then killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` drains, then kills its processes
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        time.sleep(1)
        survivors = _head_processes(self.temp_dir)
        for proc in survivors:  # anything that outlived the head is ours: kill it by pid
            proc.kill()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [" ".join(p.info["cmdline"] or ())[:200] for p in survivors]


@pytest.fixture(scope="module")
def ray_head():
    head = Head()
    try:
        head.wait_ready()
        yield head
    finally:
        survivors = head.stop()
        assert not survivors, f"processes of the test head survived SIGTERM: {survivors}"


def _write_beir(folder: Path) -> tuple[int, int]:
    """A tiny BEIR dataset: 4 topics x 8 documents, 4 train and 2 test queries per topic."""
    topics = {"cat": "cats purr and sleep", "rocket": "rockets burn fuel to orbit",
              "bread": "bakers knead dough for bread", "river": "rivers carry water to the sea"}
    folder.joinpath("qrels").mkdir(parents=True)
    corpus, queries, train, test = [], [], [], []
    for t, (name, text) in enumerate(topics.items()):
        for i in range(8):
            corpus.append({"_id": f"{name}-d{i}", "title": f"{name} {i}", "text": f"{text} note {i} of {name}"})
        for j in range(6):
            qid = f"q{t}-{j}"
            queries.append({"_id": qid, "text": f"what about {name} number {j}"})
            (train if j < 4 else test).append(f"{qid}\t{name}-d{j}\t1")
    folder.joinpath("corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    folder.joinpath("queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for split, rows in (("train", train), ("test", test)):
        folder.joinpath("qrels", f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return len(corpus), len(test)


def _wait_for_job(head: Head, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = "UNKNOWN"
    while time.monotonic() < deadline:
        res = head.ray("job", "status", job_id)
        text = res.stdout + res.stderr  # the CLI's wording per status (ray/dashboard/modules/job/cli.py)
        final = {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}
        match = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)", text)
        if match:
            return final[match.group(1)]
        match = re.search(rf"Status for job '{job_id}': (\w+)", text)
        status = match.group(1) if match else f"unparsed: {text[-300:]}"
        time.sleep(3)
    head.ray("job", "stop", job_id)
    return f"TIMEOUT after {timeout}s (last status {status})"


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_job_via_ray_job_submit(ray_head, tiny_bert, tmp_path):
    num_docs, num_test = _write_beir(tmp_path / "beir" / "tiny")
    # the shipped runtime_env, with outputs redirected into this test's tmp dir
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["IR_OUTPUT_ROOT"] = str(tmp_path / "outputs")
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    job_id = f"ir-test-{uuid.uuid4().hex[:8]}"
    overrides = [  # the shipped SciFact config, shrunk to a 2-step fine-tune of a tiny BERT
        "dataset=tiny", f"data_dir={tmp_path / 'beir'}", "output_dir=pipeline", "mining.enabled=false",
        f"train.model.name_or_path={tiny_bert}", "train.model.query_max_length=16",
        "train.model.document_max_length=24", "train.scaling.num_workers=2", "train.scaling.cpus_per_worker=0.5",
        "train.scaling.torch_threads=1", "train.batch_size=4", "train.epochs=1", "train.max_steps=2",
        "train.log_every=1", "train.checkpoint_every=0", "train.bf16=false", "eval.batch_size=16", "eval.top_k=10",
        "eval.bf16=false", "reranker.enabled=false"]  # the reranker stage: tests/test_pipeline_reranker.py
    submit = ray_head.ray("job", "submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
                          "--runtime-env", str(tmp_path / "runtime_env.yaml"), "--",
                          "python", "jobs/pipeline.py", "--config", "jobs/configs/scifact_minilm.yaml", *overrides)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]

    status = _wait_for_job(ray_head, job_id, timeout=480)
    logs = ray_head.ray("job", "logs", job_id)
    assert logs.returncode == 0, logs.stderr[-2000:]
    assert status == "SUCCEEDED", f"{status}\n{logs.stdout[-6000:]}"

    # the job ran the uploaded copy of this repo (no PYTHONPATH, no install of this worktree on the head)
    code = re.search(r"\[pipeline\] distributed_ir code: (\S+)", logs.stdout)
    assert code, logs.stdout[-3000:]
    pkg = Path(code.group(1)).parent
    assert pkg.parent.name == "working_dir_files" and pkg.name.startswith("_ray_pkg_")
    assert str(pkg).startswith(ray_head.temp_dir)
    assert (pkg / "distributed_ir" / "jobenv.py").read_text() == (REPO / "distributed_ir" / "jobenv.py").read_text()
    assert (pkg / "jobs" / "configs" / "scifact_minilm.yaml").is_file()
    for excluded in (".git", ".venv", "outputs", "data"):  # runtime_env excludes + .gitignore kept it small
        assert not (pkg / excluded).exists() or not any((pkg / excluded).iterdir()), excluded
    assert "2 worker(s) x batch 4" in logs.stdout and "step 2/2" in logs.stdout

    # outputs under IR_OUTPUT_ROOT (not inside Ray's temporary working-dir copy)
    out = tmp_path / "outputs" / "pipeline"
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"bm25", "base", "finetuned", "hybrid"}  # the shipped config has hybrid on
    # each metrics row is what pytrec_eval (trec_eval) computes from the run file the job wrote
    qrels: dict[str, dict[str, int]] = {}
    for line in (tmp_path / "beir" / "tiny" / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, doc_id, rel = line.split("\t")
        qrels.setdefault(qid, {})[doc_id] = int(rel)
    for name, run_file in (("base", "run_base.trec"), ("finetuned", "run.trec"), ("bm25", "run_bm25.trec"),
                           ("hybrid", "run_hybrid.trec")):
        with (out / run_file).open() as fh:
            theirs = pytrec_means(dict(pytrec_eval.parse_run(fh)), qrels)
        row = report["metrics"][name]
        assert row["num_queries"] == theirs["num_queries"] == num_test
        for metric in ("ndcg@10", "mrr@10", "recall@100", "map@100"):
            assert row[metric] == pytest.approx(theirs[metric], abs=1e-12), (name, metric)
    assert report["train"]["records"] == 16 and report["train"]["step"] == 2
    assert report["config"]["output_dir"] == str(out)
    run_lines = (out / "run.trec").read_text().splitlines()
    assert {line.split()[0] for line in run_lines} == {f"q{t}-{j}" for t in range(4) for j in (4, 5)}
    assert len(run_lines) == num_test * 10
    assert (out / "train" / "model" / "modules.json").is_file()
    assert not (pkg / "pipeline").exists()
    assert f"encoding {num_docs} documents with the base model" in logs.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_head_requires_the_token(ray_head):
    """Token auth stays on for the local head: no token or a wrong token is refused."""
    ok = ray_head.ray("job", "list")
    assert ok.returncode == 0, ok.stderr[-2000:]
    wrong = ray_head.ray("job", "list", env={"RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert wrong.returncode != 0 and "invalid or incorrect" in wrong.stderr
    missing = ray_head.ray("job", "list", env={"RAY_AUTH_MODE": "disabled"})
    assert missing.returncode != 0 and "Missing authentication token" in missing.stderr


def test_relative_outputs_go_under_ir_output_root(tmp_path, monkeypatch):
    from distributed_ir.config_loader import ConfigError
    from distributed_ir.jobenv import output_path

    monkeypatch.delenv("IR_OUTPUT_ROOT", raising=False)
    assert output_path("outputs/x") == "outputs/x"  # unset: unchanged (relative to the cwd)
    monkeypatch.setenv("IR_OUTPUT_ROOT", str(tmp_path))
    assert output_path("outputs/x") == str(tmp_path / "outputs" / "x")
    assert output_path("/abs/x") == "/abs/x" and output_path("s3://b/x") == "s3://b/x" and output_path("") == ""
    # unset inside Ray's temporary working-dir copy: refused with what to set, not silently lost
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert output_path("outputs/x") == str(tmp_path / "outputs" / "x")  # IR_OUTPUT_ROOT set: fine there
    monkeypatch.delenv("IR_OUTPUT_ROOT")
    with pytest.raises(ConfigError, match="IR_OUTPUT_ROOT") as err:
        output_path("outputs/x")
    assert "would vanish" in str(err.value) and "cluster/runtime_env.yaml" in str(err.value)
    assert output_path("/abs/x") == "/abs/x" and output_path("s3://b/x") == "s3://b/x"
    monkeypatch.chdir(tmp_path)
    assert output_path("outputs/x") == "outputs/x"  # an ordinary folder: relative to it, as before
    monkeypatch.setenv("IR_OUTPUT_ROOT", str(tmp_path))
    # the CLI applies it to --out (here: evaluate's metrics file), run from another directory
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 2.0 t\nq1 Q0 d2 2 1.0 t\n")
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    res = run_cli("evaluate", "--run", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "qrels.tsv"),
                  "--out", "eval/metrics.json", cwd=REPO / "jobs", env={"IR_OUTPUT_ROOT": str(tmp_path / "root")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "root" / "eval" / "metrics.json").read_text())["mrr@10"] == 0.5
    assert not (REPO / "jobs" / "eval").exists()
