"""cluster/: launcher YAMLs pass Ray's own autoscaler validation (offline), broken copies fail it;
KubeRay manifests have the structure the operator needs; every entrypoint names real files."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from distributed_ir.config import PipelineConfig, TrainConfig
from distributed_ir.config_loader import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = ("aws.yaml", "gcp.yaml")
KUBERAY = ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml")
SHARED_ENV = ("runtime_env.yaml",)


def _validate(config: dict) -> dict:
    """What `ray up` checks before touching a cloud: defaults merged, then the JSON schema and rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # merges <provider>/defaults.yaml; no cloud calls
    validate_config(prepared)
    return prepared


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _torch_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if d.startswith("torch=="))


def test_every_cluster_yaml_is_checked_here():
    assert sorted(str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")) == sorted(
        LAUNCHER + KUBERAY + SHARED_ENV)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_validator(name):
    config = _load(name)
    prepared = _validate(config)
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and set(nodes) == {"head", "cpu_worker", "gpu_worker", "gpu8_worker"}
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] == 8
    assert nodes["gpu8_worker"]["min_workers"] == 0 and nodes["gpu8_worker"]["max_workers"] >= 1
    assert nodes["cpu_worker"]["min_workers"] == 0 and nodes["cpu_worker"]["max_workers"] >= 1
    assert prepared["max_workers"] >= sum(nodes[n]["max_workers"] for n in ("cpu_worker", "gpu_worker", "gpu8_worker"))
    # 1 and 8 GPUs per node: declared (GCP reports none to the autoscaler) or by instance type (AWS)
    gpus = {n: nodes[n]["resources"].get("GPU") or {"g5.2xlarge": 1, "p4d.24xlarge": 8}.get(
        nodes[n]["node_config"].get("InstanceType")) for n in ("gpu_worker", "gpu8_worker")}
    assert gpus == {"gpu_worker": 1, "gpu8_worker": 8}
    # shared storage: every node's host mounts /mnt/shared before its container starts, and the
    # container sees it (a multi-node run reads data and writes checkpoints there)
    init = " ".join(config["initialization_commands"])
    assert re.search(r"mount -t nfs4? .* /mnt/shared", init), init
    assert "-v /mnt/shared:/mnt/shared" in config["docker"]["run_options"]
    # images pinned to the Ray version this project pins; GPU image for GPU workers
    docker = config["docker"]
    images = [docker["image"], docker["head_image"], docker["worker_image"],
              nodes["cpu_worker"]["docker"]["worker_image"]]
    assert all(re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-(cpu|gpu)", i) for i in images)
    assert docker["worker_image"].endswith("-gpu")
    # the project is installed with the pinned torch, from the repository mounted by file_mounts
    setup = " ".join(config["setup_commands"])
    assert f"pip install {_torch_pin()}" in setup and "pip install -e '.[gpu]'" in setup
    mounts = config["file_mounts"]
    assert any(src == "." and "cd " + dst in setup for dst, src in mounts.items())
    # token auth on every node, with the token file copied to every node
    assert "~/.ray/auth_token" in mounts.values()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("export RAY_AUTH_MODE=token;" in c for c in start), key
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


@pytest.mark.parametrize("name", LAUNCHER)
@pytest.mark.parametrize("breakage, error, message", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="eight"), jsonschema.ValidationError,
     "'eight' is not of type 'integer'"),
    (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), jsonschema.ValidationError,
     "0.5 is not of type 'integer'"),
    (lambda c: c.update(idle_timout_minutes=5), jsonschema.ValidationError, "'idle_timout_minutes' was unexpected"),
    (lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"), jsonschema.ValidationError,
     "'node_config' is a required property"),
    (lambda c: c["docker"].update(imagee="x"), jsonschema.ValidationError, "'imagee' was unexpected"),
    (lambda c: c.update(head_node_type="gpu_head"), ValueError, "head_node_type` must be one of"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=20), ValueError,
     "global `max_workers` is smaller than the sum of `min_workers`"),
], ids=["wrong-type", "fractional-gpu", "unknown-key", "missing-node-config", "unknown-docker-key",
        "unknown-head-type", "min-over-max"])
def test_broken_launcher_config_fails_rays_validator(name, breakage, error, message):
    config = _load(name)
    breakage(config)
    with pytest.raises(error, match=re.escape(message)):
        _validate(config)


def _manifests(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == ray.__version__, where
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["authOptions"] == {"mode": "token"}, where
    head = spec["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert "gpu" in groups, where
    pods = [("head", head["template"])] + [(n, g["template"]) for n, g in groups.items()]
    for group, template in pods:
        for c in _containers(template):
            image, _, tag = c["image"].rpartition(":")
            assert image and tag and tag != "latest", f"{where} {group}: image not pinned: {c['image']}"
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[kind]), f"{where} {group}: {kind} need cpu and memory"
            gpus = res["limits"].get("nvidia.com/gpu", 0)
            assert gpus == res["requests"].get("nvidia.com/gpu", gpus), f"{where} {group}: GPU request != limit"
            assert (gpus >= 1) == (group == "gpu"), f"{where} {group}: GPUs only in the gpu group"
    for name, g in groups.items():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where} {name}: replicas out of range"
    assert groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["maxReplicas"] == 8, where
    assert {p["containerPort"] for p in _containers(head["template"])[0]["ports"]} >= {6379, 8265, 10001}


def test_raycluster_manifest():
    docs = {d["kind"]: d for d in _manifests("kuberay/raycluster.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "RayCluster"}
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    assert {g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]} == {"cpu", "gpu"}
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for template in [cluster["spec"]["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["spec"]["workerGroupSpecs"]]:
        claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [claim]


def _entrypoint_files(entrypoint: str) -> tuple[Path, Path, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), entrypoint
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2:] if "=" in a]
    return REPO / argv[1], REPO / config, overrides


def test_rayjob_manifest_runs_a_real_job_with_the_shared_runtime_env():
    (job,) = _manifests("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"], "rayjob.yaml")
    script, config, overrides = _entrypoint_files(job["spec"]["entrypoint"])
    assert script.is_file() and config.is_file(), (script, config)
    cls = PipelineConfig if script.name == "pipeline.py" else TrainConfig
    cfg = load_config(cls, config, overrides)  # the entrypoint's overrides are valid keys and values
    assert cfg.train.scaling.use_gpu is True
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared = _load("runtime_env.yaml")
    assert set(env["env_vars"]) == set(shared["env_vars"])
    assert env["excludes"] == shared["excludes"]
    assert env["working_dir"] == "/home/ray/distributed-ir"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "WORKDIR /home/ray/distributed-ir" in dockerfile and f"rayproject/ray:{ray.__version__}-" in dockerfile
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == \
        _containers(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]["image"]


def test_shared_runtime_env():
    env = _load("runtime_env.yaml")
    assert set(env) == {"env_vars", "excludes"}  # no pip/conda: nodes bring the pinned stack
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values
    # anchored patterns: "/data/" must not exclude distributed_ir/data/
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    assert spec.match_file("data/scifact/corpus.jsonl") and spec.match_file(".venv/bin/python")
    assert spec.match_file("outputs/x/metrics.json") and spec.match_file(".git/HEAD")
    assert not spec.match_file("distributed_ir/data/beir.py") and not spec.match_file("jobs/configs/scifact_minilm.yaml")


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml"])
def test_documented_submit_commands_name_real_files(name):
    """The `ray job submit` lines in each file's header name a job and config that exist and load."""
    text = (CLUSTER / name).read_text()
    block = re.search(r"ray job submit .*?-- \\\n#\s+(python .*?)\n#\s+(.*?)\n", text)
    assert block, name
    script, config, overrides = _entrypoint_files(block.group(1).rstrip("\\ ") + " " + block.group(2))
    assert script.is_file()
    load_config(PipelineConfig, config, overrides)
