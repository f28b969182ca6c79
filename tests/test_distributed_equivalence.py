"""2 workers with gathered negatives == 1 worker on the union batch (loss and gradients, 1e-5).

Runs the real training step (the embedder task's train module + DDP) in 2 gloo processes on
conftest's ``shared_positive_batch``.  Query 5 (rank 1) shares query 1's positive (rank 0): the
false-negative mask must see the gathered columns.  A distillation term (teacher scores of each
query's own candidates) is added to the InfoNCE loss.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_ir.config import TrainConfig
from distributed_ir.config_loader import from_dict
from distributed_ir.models.embedder import Embedder
from distributed_ir.train.tasks import get_task
from tests.conftest import free_ports, shared_positive_batch


def _grads(embedder: Embedder) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in embedder.parameters() if p.requires_grad and p.grad is not None])


def _step(model_path: str, rank: int, world: int, gather: bool = True, mask: bool = True) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    task = get_task(from_dict(TrainConfig, {"model": {"name_or_path": model_path},
                                            "num_negatives": 2,
                                            "loss": {"temperature": 0.05, "gather_across_workers": gather,
                                                     "mask_shared_positives": mask, "distill_weight": 0.5}}))
    inner = task.build()
    embedder = inner.embedder
    module = torch.nn.parallel.DistributedDataParallel(inner) if world > 1 else inner
    loss = module(**task.inputs(inner, shared_positive_batch(rank, world)))
    loss.backward()
    return float(loss), _grads(embedder)


def _worker(rank: int, world: int, model_path: str, port: int, out: str, gather: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loss, grads = _step(model_path, rank, world, gather)
    losses = [None] * world
    dist.all_gather_object(losses, loss)
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_equal_one_worker_on_union_batch(tiny_bert, tmp_path):
    loss_1, grads_1 = _step(str(tiny_bert), 0, 1)
    assert abs(_step(str(tiny_bert), 0, 1, mask=False)[0] - loss_1) > 1e-4  # the shared positive is masked
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tiny_bert), free_ports(1)[0], str(out), True), nprocs=2, join=True)
    res = torch.load(out, weights_only=True)
    # the union loss is the mean over all 8 queries = mean of the two ranks' means (equal halves)
    assert abs(sum(res["losses"]) / 2 - loss_1) < 1e-5
    assert res["grads"].shape == grads_1.shape
    torch.testing.assert_close(res["grads"], grads_1, atol=1e-5, rtol=1e-4)
    assert grads_1.abs().max() > 1e-3  # not trivially zero
    # control: without cross-worker negatives each rank sees half the documents -> different maths
    mp.spawn(_worker, args=(2, str(tiny_bert), free_ports(1)[0], str(out), False), nprocs=2, join=True)
    local = torch.load(out, weights_only=True)
    assert abs(sum(local["losses"]) / 2 - loss_1) > 1e-3
    assert (local["grads"] - grads_1).abs().max() > 1e-4
