"""ColBERT late-interaction reranker (Khattab & Zaharia 2020; the bge-m3 multi-vector variant).

Token states of the encoder (the ``[CLS]`` position dropped, as bge-m3 does) go through a
linear head ``hidden -> colbert_dim`` and are L2-normalised; padding is masked out.  The score
of query q and document d is MaxSim, normalised by the query's token count:

.. math:: s(q, d) = \\frac{1}{|q|}\\sum_{i \\in q} \\max_{j \\in d} \\; q_i \\cdot d_j

A bge-m3-style checkpoint's ``colbert_linear.pt`` (a ``Linear`` state dict) is loaded with
``torch.load(weights_only=True)`` when present (its shape decides ``colbert_dim``); otherwise
the head is initialised.  Long documents are cut into overlapping windows of
``document_max_length`` tokens; score = max over windows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distributed_ir.models.pooling import prepare_backbone
from distributed_ir.models.reranker_base import RerankerBase, autocast_for, load_hf, pad_batch, write_settings
from distributed_ir.models.settings import RerankerSettings

HEAD_FILE = "colbert_linear.pt"


def maxsim(q: torch.Tensor, q_mask: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor,
           all_pairs: bool = False) -> torch.Tensor:
    """MaxSim / |q|.  ``q`` [B, Lq, D], ``d`` [B or N, Ld, D], masks 0/1 of the same leading shape.

    ``all_pairs=False``: row b of q against row b of d -> [B].  ``all_pairs=True``: every query
    against every document -> [B, N] (in-batch and hard negatives for training).
    """
    q, d = q.float(), d.float()
    neg = torch.finfo(torch.float32).min
    # float32 whatever the autocast around it (bf16 would round the scores and overflow on `neg`)
    with torch.autocast(q.device.type, enabled=False):
        if all_pairs:
            sim = torch.einsum("bid,njd->bnij", q, d)
            sim = sim.masked_fill(d_mask[None, :, None, :] == 0, neg)
            best = sim.max(dim=-1).values  # [B, N, Lq]
            return (best * q_mask[:, None, :]).sum(-1) / q_mask.sum(-1, keepdim=True).clamp(min=1)
        sim = torch.einsum("bid,bjd->bij", q, d).masked_fill(d_mask[:, None, :] == 0, neg)
        best = sim.max(dim=-1).values  # [B, Lq]
        return (best * q_mask).sum(-1) / q_mask.sum(-1).clamp(min=1)


class ColBERTReranker(RerankerBase):
    """``encode(ids, mask) -> (vectors, mask)``; ``forward(query, document) -> [B, N]`` MaxSim."""

    kind = "colbert"

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: RerankerSettings,
                 head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        hidden = int(backbone.config.hidden_size)
        if head is None:
            head = nn.Linear(hidden, settings.colbert_dim)
        if head.in_features != hidden:
            raise ValueError(f"colbert head takes {head.in_features} inputs, the encoder gives {hidden}")
        self.colbert_linear = head
        self.settings = replace(settings, colbert_dim=head.out_features)
        prepare_backbone(backbone, tokenizer)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str, settings: RerankerSettings | None = None,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                        **overrides: Any) -> ColBERTReranker:
        """Encoder + tokenizer from a folder; ``colbert_linear.pt`` there is loaded, else a new head."""
        from transformers import AutoModel

        path, settings, tokenizer, backbone = load_hf(AutoModel, name_or_path, settings, dtype, trust_remote_code,
                                                      overrides)
        head = load_head(Path(path) / HEAD_FILE, int(backbone.config.hidden_size))
        if head is None:
            head = new_head(int(backbone.config.hidden_size), settings.colbert_dim)
        return cls(backbone, tokenizer, settings, head)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        torch.save({k: v.detach().cpu() for k, v in self.colbert_linear.state_dict().items()}, path / HEAD_FILE)
        write_settings(path, self.kind, self.settings, {"similarity": "maxsim"})
        return path

    def head_parameters(self) -> list[nn.Parameter]:
        """The head's parameters (trained with their own learning rate)."""
        return list(self.colbert_linear.parameters())

    # ------------------------------------------------------------------ int8 (ONNX Runtime) body
    onnx_body = ("backbone", "last_hidden_state")  # the encoder; the head and MaxSim stay in torch

    def onnx_example(self) -> dict[str, torch.Tensor]:
        from distributed_ir.models.onnx_int8 import EXAMPLE_TEXTS

        return {k: v.cpu() for k, v in self.tokenize(list(EXAMPLE_TEXTS), "document").items()}

    def with_body(self, body: nn.Module) -> ColBERTReranker:
        return ColBERTReranker(body, self.tokenizer, self.settings, head=self.colbert_linear)

    # ------------------------------------------------------------------ encode / forward
    def scoring_backbone(self) -> nn.Module:
        return self.backbone

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised token vectors without the first ([CLS]) position, and their mask."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        vecs = nn.functional.normalize(self.colbert_linear(hidden[:, 1:]).float(), dim=-1)
        mask = attention_mask[:, 1:]
        return vecs * mask[..., None], mask

    def forward(self, query: dict[str, torch.Tensor], document: dict[str, torch.Tensor],
                all_pairs: bool = True) -> torch.Tensor:
        q, q_mask = self.encode(**query)
        d, d_mask = self.encode(**document)
        return maxsim(q, q_mask, d, d_mask, all_pairs=all_pairs)

    def tokenize(self, texts: Sequence[str], kind: str, max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Ids and mask on the model's device, cut to the kind's max length (``max_length``: this
        call's instead, e.g. training's shorter documents)."""
        max_len = max_length or (self.settings.query_max_length if kind == "query" else self.settings.document_max_length)
        enc = self.tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    # ------------------------------------------------------------------ inference
    def _chunks(self, documents: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token windows of each document (up to ``max_chunks``) and the document each belongs to."""
        s = self.settings
        enc = self.tokenizer(documents, truncation=True, max_length=s.document_max_length,
                             stride=min(s.chunk_overlap, (s.document_max_length - 2) // 2) if s.max_chunks > 1 else 0,
                             return_overflowing_tokens=s.max_chunks > 1)
        mapping = enc.get("overflow_to_sample_mapping", list(range(len(documents))))
        chunks, owners, seen = [], [], {}
        for chunk, owner in zip(enc["input_ids"], mapping):
            seen[owner] = seen.get(owner, 0) + 1
            if seen[owner] <= s.max_chunks:
                chunks.append(chunk)
                owners.append(int(owner))
        return chunks, owners

    def build_units(self, queries: Sequence[str], documents: Sequence[str]) -> tuple[list[dict], list[int]]:
        q_enc = self.tokenizer(list(queries), truncation=True, max_length=self.settings.query_max_length)["input_ids"]
        chunks, owners = self._chunks(list(documents))
        return [{"q_input_ids": q_enc[o], "d_input_ids": c} for c, o in zip(chunks, owners)], owners

    def score_units(self, units: list[dict]) -> torch.Tensor:
        pad = self.tokenizer.pad_token_id
        q_ids, q_mask = pad_batch([u["q_input_ids"] for u in units], pad)
        d_ids, d_mask = pad_batch([u["d_input_ids"] for u in units], pad)
        dev = self.device
        return self({"input_ids": q_ids.to(dev), "attention_mask": q_mask.to(dev)},
                    {"input_ids": d_ids.to(dev), "attention_mask": d_mask.to(dev)}, all_pairs=False)

    def _encode_ids(self, seqs: list[list[int]], batch_size: int) -> list[torch.Tensor]:
        """Token vectors ``[len - 1, dim]`` (float32, CPU; [CLS] dropped, no padding) per id list,
        encoded in length-sorted batches."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = pad_batch([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            vecs, vmask = self.encode(ids.to(self.device), mask.to(self.device))
            vecs, lengths = vecs.float().cpu(), vmask.sum(-1).tolist()
            for row, i in enumerate(idx):
                out[i] = vecs[row, :lengths[row]]
        return out

    def fill_scores(self, queries: list[str], documents: list[str], out: np.ndarray, batch_size: int,
                    dtype: torch.dtype | None) -> None:
        """MaxSim per pair, max over a document's chunks.

        Late interaction needs no joint forward: each distinct query and each distinct document
        is encoded once, however many pairs it is in (a top-100 rerank scores each document for
        many queries), then every pair is a small ``[Lq, dim] x [dim, Ld]`` product.
        """
        q_texts, d_texts = list(dict.fromkeys(queries)), list(dict.fromkeys(documents))
        q_index, d_index = {t: i for i, t in enumerate(q_texts)}, {t: i for i, t in enumerate(d_texts)}
        q_ids = self.tokenizer(q_texts, truncation=True, max_length=self.settings.query_max_length)["input_ids"]
        chunks, owners = self._chunks(d_texts)
        with autocast_for(self.device, dtype):
            q_vecs = self._encode_ids(q_ids, batch_size)
            c_vecs = self._encode_ids(chunks, batch_size)
        doc_chunks: list[list[torch.Tensor]] = [[] for _ in d_texts]
        for vec, owner in zip(c_vecs, owners):
            doc_chunks[owner].append(vec)
        for i, (q, d) in enumerate(zip(queries, documents)):
            qv = q_vecs[q_index[q]]
            best = max(float((qv @ c.T).max(dim=1).values.sum()) for c in doc_chunks[d_index[d]])
            out[i] = best / max(1, qv.shape[0])


def new_head(hidden: int, dim: int, seed: int = 0) -> nn.Linear:
    """A fresh ``Linear(hidden, dim)`` with ``nn.Linear``'s default init drawn from its own seeded
    generator: reproducible, and the global RNG (training's dropout stream: rank 0 builds the export
    model at every checkpoint) is left untouched."""
    head = nn.Linear(hidden, dim, device="meta").to_empty(device="cpu")  # meta: no draw from the global RNG
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=gen)  # as nn.Linear.reset_parameters
        bound = 1 / math.sqrt(hidden)
        nn.init.uniform_(head.bias, -bound, bound, generator=gen)
    return head


def load_head(path: Path, hidden: int) -> nn.Linear | None:
    """A ``Linear`` from a bge-m3-style ``colbert_linear.pt`` (``weight`` [dim, hidden], ``bias``)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
    if not isinstance(state, dict) or "weight" not in state:
        raise ValueError(f"{path}: expected a state dict with 'weight' (and 'bias'), got {type(state).__name__}")
    weight = state["weight"]
    if weight.ndim != 2 or weight.shape[1] != hidden:
        raise ValueError(f"{path}: weight shape {tuple(weight.shape)} does not fit hidden size {hidden}")
    head = nn.Linear(hidden, weight.shape[0], bias="bias" in state)
    head.load_state_dict(state)
    return head
