"""Training storage on S3: checkpoints, history and the exported model written to ``s3://`` (a moto
server on 127.0.0.1), and a run resumed from a checkpoint there.

The module starts its own moto server and its own local Ray cluster *after* pointing the AWS
variables at the server (``AWS_ENDPOINT_URL``, test credentials): Ray workers inherit them, so
every process resolves ``s3://`` URIs to the local server, as pyarrow does for any S3-compatible
store.
"""

from __future__ import annotations

import tempfile

import pytest

from distributed_ir import faults
from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.data.records import write_records
from distributed_ir.train import checkpoint as ckpt
from tests.conftest import free_ports, triplets

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "ir-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_and_ray():
    import pyarrow.fs as pafs
    import ray
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for k, v in {**AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            env.setenv(k, v)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        tmp = tempfile.mkdtemp(prefix="ray-s3-", dir="/tmp")
        ray.init(num_cpus=2, _temp_dir=tmp, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
        yield fs
        ray.shutdown()
        server.stop()


def _cfg(tmp_path, tiny_bert, name: str, **kw) -> TrainConfig:
    return from_dict(TrainConfig, {
        "train_path": str(tmp_path / "train.jsonl"), "output_dir": str(tmp_path / name),
        "model": {"name_or_path": str(tiny_bert), "query_max_length": 16, "document_max_length": 24},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0}, "batch_size": 4, "num_negatives": 1, "seed": 2,
        "log_every": 2, "checkpoint_every": 2, **kw,
    })


def _files(fs, prefix: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pafs.FileType.File)


def test_checkpoints_and_model_on_s3_and_resume_from_there(s3_and_ray, tiny_bert, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from distributed_ir.train.launch import run_training

    fs = s3_and_ray
    write_records(tmp_path / "train.jsonl", triplets(16))  # 8 per step: 2 steps per epoch
    first = run_training(_cfg(tmp_path, tiny_bert, "first", max_steps=4, storage_path=f"s3://{BUCKET}/runs"))
    run = first.model_uri.removesuffix("/model")
    assert run.startswith(f"s3://{BUCKET}/runs/train-")
    files = _files(fs, run.removeprefix("s3://"))
    checkpoints = sorted({f.split("/")[0] for f in files if f.startswith("checkpoint_") and "/" in f})
    assert len(checkpoints) == 2  # steps 2 and 4 (num_to_keep=2)
    for c in checkpoints:
        assert {f"{c}/model/modules.json", f"{c}/training_state.pt", f"{c}/trainable.safetensors",
                f"{c}/history.json"} <= set(files)
    assert {"model/modules.json", "model/model.safetensors", "history.json"} <= set(files)
    assert not (tmp_path / "first" / "ray").exists()  # nothing of the run's storage on local disk
    # the uploaded model is the one the run returned
    with fs.open_input_stream(run.removeprefix("s3://") + "/model/model.safetensors") as fh:
        uploaded = fh.read()
    assert uploaded == (first.model_path / "model.safetensors").read_bytes()

    # resume from the step-4 checkpoint on S3 (each worker downloads it) and train to step 6
    trace = tmp_path / "trace"
    monkeypatch.setenv(faults.TRACE, str(trace))
    latest = "s3://" + first.checkpoint_path
    assert ckpt.is_uri(latest) and latest.startswith(run)
    second = run_training(_cfg(tmp_path, tiny_bert, "second", max_steps=6, resume_from=latest))
    entries = faults.read_trace(trace)
    assert {e["rank"] for e in entries} == {0, 1}
    assert min(e["step"] for e in entries) == 5 and max(e["step"] for e in entries) == 6  # resumed, not redone
    assert second.metrics["step"] == 6
    assert [h["step"] for h in second.history] == [2, 4, 6]  # the checkpoint's history continues
    assert [h["loss"] for h in second.history[:2]] == [h["loss"] for h in first.history]
    before, after = load_file(first.model_path / "model.safetensors"), load_file(second.model_path / "model.safetensors")
    assert any(not (before[n] == after[n]).all() for n in before)  # two more steps moved the weights
    with pytest.raises(FileNotFoundError, match="not a distributed-ir training checkpoint"):
        run_training(_cfg(tmp_path, tiny_bert, "third", max_steps=6, max_failures=0,
                          resume_from=f"s3://{BUCKET}/runs/nothing-here"))
