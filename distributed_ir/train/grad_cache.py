"""Cached in-batch negatives (GradCache): a batch larger than activation memory allows, exact gradients.

An in-batch contrastive loss needs every embedding of the (gathered) batch at once, but its
gradient reaches the encoder only through those embeddings:
dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta).  So one step runs in three parts (Gao et al. 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):

1. **Encode without a graph.**  Every chunk of ``chunk`` queries, then of ``chunk`` documents,
   is encoded under ``torch.no_grad``; the RNG state before each chunk is kept.
2. **Loss on cached embeddings.**  The embeddings, detached and made leaves, go through the
   task's unchanged loss (InfoNCE with its false-negative mask, hard negatives, cross-worker
   all-gather, distillation): ``torch.autograd.grad`` gives dL/de for each chunk.  The all-gather's
   backward is a collective, so every rank runs this part in step.
3. **Re-encode with a graph, one chunk at a time.**  With the chunk's RNG state replayed (the
   same dropout masks as part 1, the way ``torch.utils.checkpoint`` does it), each chunk is
   encoded again and ``sum(e . dL/de)`` is back-propagated: its parameter gradient is exactly the
   chunk's share of dL/dtheta, and only one chunk's activations are alive at a time.

Peak activation memory is one chunk's instead of the whole batch's, for about one extra forward
pass.  The gradients equal the uncached batch's (tests/test_grad_cache.py) provided the encoder
treats rows independently (true of transformers; dropout draws differ per chunk, so with dropout
on the *random* masks differ from an unchunked forward, but part 3 replays part 1's exactly).

Gradient synchronisation stays the engine's, once per optimizer step: the engine passes
``chunk_context(last)`` (DDP: ``no_sync()`` for all chunks but the last of a boundary
micro-step; DeepSpeed: ``set_gradient_accumulation_boundary`` off until the last chunk) and
``backward`` (DDP: scaled ``.backward()``; DeepSpeed: ``engine.backward``, one call per chunk, each
with its own reduce epilogue).  Tools that instead call ``backward`` from inside the loss's own
backward hit ZeRO's "Gradient computed twice for this partition" (sentence-transformers #3173).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

Features = dict[str, torch.Tensor]


class RandContext:
    """The CPU RNG state (and that of the devices ``tensors`` live on) at construction;
    ``with ctx:`` runs its block from that state and leaves the caller's RNG streams untouched."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self.device_type = next((t.device.type for t in tensors if t.device.type not in ("cpu", "meta")), None)
        self._fork: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> None:
        kw = {"device_type": self.device_type} if self.device_type else {}
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True, **kw)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.devices:
            set_device_states(self.devices, self.device_states, device_type=self.device_type)

    def __exit__(self, *exc: Any) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


def split_features(features: Features, chunk: int) -> list[Features]:
    """Row chunks of tokenised inputs (each keeps the batch's padded width, so every row is
    encoded exactly as in the whole batch)."""
    rows = next(iter(features.values())).shape[0]
    return [{k: v[i:i + chunk] for k, v in features.items()} for i in range(0, rows, chunk)]


def cached_forward_backward(
    module: Callable[..., torch.Tensor],
    loss_from_embeddings: Callable[..., torch.Tensor],
    inputs: dict[str, Any],
    chunk: int,
    backward: Callable[[torch.Tensor], None],
    chunk_context: Callable[[bool], contextlib.AbstractContextManager],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """One micro-batch's loss (detached) and its parameter gradients, accumulated chunk by chunk.

    ``module(encode=features)`` encodes one chunk through the engine's wrapper (DDP module or
    DeepSpeed engine, so ZeRO-3 gathers parameters and the wrapper's hooks fire);
    ``loss_from_embeddings(q, d, **rest)`` is the train module's loss on embeddings, ``rest``
    being ``inputs`` without ``query`` / ``document``.  ``backward(surrogate)`` back-propagates one
    chunk's ``sum(e . dL/de)`` inside ``chunk_context(is_last_chunk)``.
    """
    if chunk < 1:
        raise ValueError(f"grad cache chunk must be >= 1, got {chunk}")
    rest = {k: v for k, v in inputs.items() if k not in ("query", "document")}
    chunks = split_features(inputs["query"], chunk)
    num_query_chunks = len(chunks)
    chunks += split_features(inputs["document"], chunk)

    # 1. every chunk's embeddings, no graph; the RNG state before each (dropout replay in 3)
    states: list[RandContext] = []
    cached: list[torch.Tensor] = []
    with torch.no_grad():
        for features in chunks:
            states.append(RandContext(*features.values()))
            with autocast():
                cached.append(module(encode=features).detach().requires_grad_())

    # 2. the loss on the cached embeddings and dL/d(embedding) of each chunk
    with autocast():
        loss = loss_from_embeddings(torch.cat(cached[:num_query_chunks]), torch.cat(cached[num_query_chunks:]),
                                    **rest)
    grads = torch.autograd.grad(loss, cached, allow_unused=True)
    del cached

    # 3. re-encode each chunk with a graph (same RNG) and back-propagate its cached gradient
    for i, (features, state, grad) in enumerate(zip(chunks, states, grads)):
        with chunk_context(i == len(chunks) - 1):
            with state, autocast():
                emb = module(encode=features)
            if grad is None:  # a loss that ignores these rows (still one backward: ranks stay in step)
                grad = torch.zeros_like(emb)
            backward((emb.float() * grad.float()).sum())
    return loss.detach()
